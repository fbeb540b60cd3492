#!/usr/bin/env bash
# Delete the slice (and its queued resource, if it was requested as one).
#
# Usage: launch/tpu/delete.sh
#   TPU_NAME=my-slice launch/tpu/delete.sh
#   TPU_QUEUED=1 TPU_NAME=my-slice launch/tpu/delete.sh
#
# Whatever is on the workers' disks is lost; a workdir in BUCKET stays. Settings: TPU_NAME
# TPU_PROJECT TPU_ZONE TPU_QUEUED (README.md, "TPU VM jobs").

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
maybe_usage "$@"
require TPU_NAME TPU_PROJECT TPU_ZONE

echo "deleting $TPU_NAME in $TPU_PROJECT/$TPU_ZONE"
if [[ "$TPU_QUEUED" == 1 ]]; then
  # --force deletes the slice the queued resource holds along with it.
  tpus queued-resources delete "$TPU_NAME" --force --quiet
else
  tpus tpu-vm delete "$TPU_NAME" --quiet
fi
