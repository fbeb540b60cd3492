#!/usr/bin/env bash
# Install tpa_jax (this checkout's files) on every worker of the slice.
#
# Usage: launch/tpu/setup.sh
#   TPU_NAME=my-slice BUCKET=my-bucket launch/tpu/setup.sh
#
# Copies the tracked and untracked-but-not-ignored files of this checkout to ~/$REMOTE_DIR on
# every worker, creates a Python $PYTHON_VERSION virtual environment there (with uv) and
# installs tpa_jax[$EXTRAS] with jax[tpu]==$JAX_VERSION. Run it again after changing the code.
# With BUCKET set, also mounts gs://$BUCKET at $GCS_MOUNT/$BUCKET (gcsfuse) on every worker.
# Settings: TPU_NAME TPU_PROJECT TPU_ZONE REMOTE_DIR PYTHON_VERSION JAX_VERSION EXTRAS BUCKET
# GCS_MOUNT (README.md, "TPU VM jobs").

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
maybe_usage "$@"
require TPU_NAME TPU_PROJECT TPU_ZONE REMOTE_DIR

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --files-from=- -czf "$archive")

echo "copying $(du -h "$archive" | cut -f1) of sources to every worker of $TPU_NAME"
tpus tpu-vm scp "$archive" "$TPU_NAME:tpa_jax_src.tar.gz" --worker=all

# The virtual environment survives a re-install; everything else is replaced.
on_workers "set -e
mkdir -p $REMOTE_DIR
find $REMOTE_DIR -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -xzf tpa_jax_src.tar.gz -C $REMOTE_DIR && rm tpa_jax_src.tar.gz
python3 -m pip install --quiet --user uv
cd $REMOTE_DIR
[ -x .venv/bin/python ] || ~/.local/bin/uv venv --quiet --python $PYTHON_VERSION .venv
~/.local/bin/uv pip install --quiet --python .venv/bin/python -e '.[$EXTRAS]' 'jax[tpu]==$JAX_VERSION'
.venv/bin/python -c 'import jax, tpa_jax; print(\"tpa_jax with jax\", jax.__version__)'"

if [[ -n "$BUCKET" ]]; then
  echo "mounting gs://$BUCKET at $GCS_MOUNT/$BUCKET on every worker"
  on_workers "set -e
if ! command -v gcsfuse > /dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
sudo mkdir -p $GCS_MOUNT/$BUCKET && sudo chown \$(id -u):\$(id -g) $GCS_MOUNT/$BUCKET
mountpoint -q $GCS_MOUNT/$BUCKET || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $BUCKET $GCS_MOUNT/$BUCKET"
fi
echo "installed on every worker of $TPU_NAME; next: launch/tpu/run.sh"
