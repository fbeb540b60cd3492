#!/usr/bin/env bash
# Stop a run on every worker of the slice: SIGTERM, so that it saves a checkpoint and exits.
#
# Usage: launch/tpu/stop.sh
#   RUN_NAME=es-2b launch/tpu/stop.sh
#
# The processes agree on a step, save it and exit with status 0; launch/tpu/run.sh with the
# same settings resumes from it. Settings: TPU_NAME TPU_PROJECT TPU_ZONE RUN_NAME LOG_DIR
# (README.md, "TPU VM jobs").

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
maybe_usage "$@"
require TPU_NAME TPU_PROJECT TPU_ZONE RUN_NAME LOG_DIR

on_workers "pid=\$(cat ~/$LOG_DIR/$RUN_NAME.pid) && kill -TERM \$pid && echo \"SIGTERM sent to \$pid on \$(hostname)\""
