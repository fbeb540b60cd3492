#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice for tpa_jax.
#
# Usage: launch/tpu/create.sh
#   TPU_NAME=my-slice TPU_ACCELERATOR=v5litepod-16 TPU_ZONE=us-west4-a launch/tpu/create.sh
#   TPU_QUEUED=1 TPU_SPOT=1 TPU_ACCELERATOR=v5p-32 TPU_ZONE=us-east5-a launch/tpu/create.sh
#
# TPU_QUEUED=1 requests the slice as a queued resource and waits until it is ACTIVE (polling
# every POLL_SECONDS); otherwise `tpu-vm create` returns once the slice is READY. Settings:
# TPU_NAME TPU_PROJECT TPU_ZONE TPU_ACCELERATOR TPU_RUNTIME TPU_QUEUED TPU_SPOT POLL_SECONDS
# (README.md, "TPU VM jobs").

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
maybe_usage "$@"
require TPU_NAME TPU_PROJECT TPU_ZONE TPU_ACCELERATOR TPU_RUNTIME

spot=()
if [[ "$TPU_SPOT" == 1 ]]; then
  spot=(--spot)
fi

echo "creating $TPU_ACCELERATOR '$TPU_NAME' ($TPU_RUNTIME) in $TPU_PROJECT/$TPU_ZONE"
if [[ "$TPU_QUEUED" == 1 ]]; then
  tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --accelerator-type="$TPU_ACCELERATOR" --runtime-version="$TPU_RUNTIME" "${spot[@]}"
  while true; do
    state=$(tpus queued-resources describe "$TPU_NAME" --format='value(state.state)')
    echo "queued resource $TPU_NAME: $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED) echo "error: queued resource $TPU_NAME is $state" >&2; exit 1 ;;
    esac
    sleep "$POLL_SECONDS"
  done
else
  tpus tpu-vm create "$TPU_NAME" --accelerator-type="$TPU_ACCELERATOR" \
    --version="$TPU_RUNTIME" "${spot[@]}"
fi
echo "$TPU_NAME is ready with $(num_workers) worker(s); next: launch/tpu/setup.sh"
