#!/usr/bin/env bash
# Run a tpa_jax config on every worker of the slice, then follow the log of worker $WORKER.
#
# Usage: launch/tpu/run.sh [more flags for the program...]
#   CONFIG=configs/adapt.py:model=2b,method=tpa RUN_NAME=es-2b BUCKET=my-bucket \
#     launch/tpu/run.sh --config.data.name=librispeech --config.train.num_steps=20000
#   PROGRAM=evaluate RUN_NAME=es-2b BUCKET=my-bucket launch/tpu/run.sh
#
# Every worker runs `launch/$PROGRAM.py --config=$CONFIG --workdir=$WORKDIR [flags]` in the
# background (it survives the ssh session), logging to ~/$LOG_DIR/$RUN_NAME.log; the processes
# find each other through JAX's TPU auto-detection. Running it again resumes the run from its
# newest checkpoint. FOLLOW=0 returns at once instead of following the log (launch/tpu/logs.sh).
# A multi-host slice needs a workdir every worker sees: set BUCKET (or WORKDIR to a shared
# mount). Settings: TPU_NAME TPU_PROJECT TPU_ZONE CONFIG PROGRAM RUN_NAME WORKDIR BUCKET
# GCS_MOUNT DATA_DIR REMOTE_DIR LOG_DIR WORKER FOLLOW (README.md, "TPU VM jobs").

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
maybe_usage "$@"
require TPU_NAME TPU_PROJECT TPU_ZONE CONFIG PROGRAM RUN_NAME WORKDIR REMOTE_DIR LOG_DIR

case "$PROGRAM" in
  train | evaluate | study) ;;
  *) echo "error: PROGRAM=$PROGRAM; accepted: train, evaluate, study" >&2; exit 2 ;;
esac
workers=$(num_workers)
if [[ "$workers" -gt 1 && -z "$BUCKET" && "$WORKDIR" != /* ]]; then
  echo "error: $TPU_NAME has $workers workers, and WORKDIR=$WORKDIR is on each worker's own" \
    "disk; checkpoints need a directory every worker sees: set BUCKET (or WORKDIR to a" \
    "shared mount)" >&2
  exit 2
fi

args=(--config="$CONFIG" --workdir="$WORKDIR")
if [[ -n "$DATA_DIR" ]]; then
  args+=(--config.data.data_dir="$DATA_DIR")
fi
args+=("$@")
# Quoted for the worker's shell, so values with spaces or commas arrive as they are.
quoted=$(printf ' %q' "${args[@]}")

echo "starting launch/$PROGRAM.py on $workers worker(s) of $TPU_NAME: $CONFIG -> $WORKDIR"
on_workers "set -e
mkdir -p ~/$LOG_DIR
cd $REMOTE_DIR
nohup .venv/bin/python launch/$PROGRAM.py$quoted > ~/$LOG_DIR/$RUN_NAME.log 2>&1 < /dev/null &
echo \$! > ~/$LOG_DIR/$RUN_NAME.pid"

if [[ "${FOLLOW:-1}" == 1 ]]; then
  exec "$(dirname "$0")/logs.sh"
fi
