#!/usr/bin/env bash
# Follow the log of a run on a worker of the slice (Ctrl-C stops following, not the run).
#
# Usage: launch/tpu/logs.sh
#   RUN_NAME=es-2b launch/tpu/logs.sh            # worker 0: progress, ETA, evaluation
#   RUN_NAME=es-2b WORKER=all launch/tpu/logs.sh  # every worker, interleaved
#
# Settings: TPU_NAME TPU_PROJECT TPU_ZONE RUN_NAME LOG_DIR WORKER (README.md, "TPU VM jobs").

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
maybe_usage "$@"
require TPU_NAME TPU_PROJECT TPU_ZONE RUN_NAME LOG_DIR WORKER

on_workers "tail -n +1 -F ~/$LOG_DIR/$RUN_NAME.log" "$WORKER"
