# shellcheck shell=bash
# Settings and helpers shared by the TPU VM scripts in this folder (sourced, not run).
# Every setting is an environment variable with a default; README.md ("TPU VM jobs") lists them.

# The slice: its name, where it lives, what it is.
TPU_NAME=${TPU_NAME:-tpa-jax-${USER:-user}}
TPU_PROJECT=${TPU_PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
TPU_ZONE=${TPU_ZONE:-us-west4-a}
TPU_ACCELERATOR=${TPU_ACCELERATOR:-v5litepod-8}
# The TPU software version that suits each generation (Google's table for JAX).
case "$TPU_ACCELERATOR" in
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
TPU_RUNTIME=${TPU_RUNTIME:-$default_runtime}
# 1: request the slice as a queued resource (waits for capacity); 0: create it directly.
TPU_QUEUED=${TPU_QUEUED:-0}
# 1: a Spot slice (cheaper, may be preempted: the run saves on SIGTERM, relaunch to resume).
TPU_SPOT=${TPU_SPOT:-0}
# Seconds between state checks while a queued resource waits for capacity.
POLL_SECONDS=${POLL_SECONDS:-30}

# The software on the workers.
REMOTE_DIR=${REMOTE_DIR:-tpa_jax}  # relative to each worker's home
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_VERSION=${JAX_VERSION:-0.10.2}
EXTRAS=${EXTRAS:-speech}

# The run.
RUN_NAME=${RUN_NAME:-tpa}
CONFIG=${CONFIG:-configs/tiny.py}
PROGRAM=${PROGRAM:-train}
# A Cloud Storage bucket (name, no gs://) mounted with gcsfuse on every worker at
# $GCS_MOUNT/$BUCKET: the shared workdir that a multi-host slice needs.
BUCKET=${BUCKET:-}
GCS_MOUNT=${GCS_MOUNT:-/mnt/gcs}
if [[ -n "$BUCKET" ]]; then
  WORKDIR=${WORKDIR:-$GCS_MOUNT/$BUCKET/tpa_jax/$RUN_NAME}
else
  WORKDIR=${WORKDIR:-runs/$RUN_NAME}  # relative to REMOTE_DIR, on each worker's own disk
fi
# config.data.data_dir on the workers ('' : <workdir>/data); each worker reads its own copy.
DATA_DIR=${DATA_DIR:-}
LOG_DIR=${LOG_DIR:-tpa_jax_logs}  # relative to each worker's home
WORKER=${WORKER:-0}  # the worker whose log logs.sh follows ('all' for every one)

# Prints the usage text: the comment block at the top of the calling script.
usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
}

# Exits with the usage text when the first argument asks for help.
maybe_usage() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
  fi
}

require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name}" ]]; then
      echo "error: $name is empty; set it in the environment (see $0 --help)" >&2
      exit 2
    fi
  done
}

# gcloud compute tpus ... in the slice's project and zone.
tpus() {
  gcloud compute tpus "$@" --project="$TPU_PROJECT" --zone="$TPU_ZONE"
}

# Runs a shell command on workers (default: all of them at once).
on_workers() {
  tpus tpu-vm ssh "$TPU_NAME" --worker="${2:-all}" --command="$1"
}

# Number of workers (hosts) of the slice.
num_workers() {
  tpus tpu-vm describe "$TPU_NAME" --format='value(networkEndpoints[].ipAddress)' \
    | tr ';' '\n' | grep -c . || true
}
