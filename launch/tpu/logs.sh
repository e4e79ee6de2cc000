#!/usr/bin/env bash
# Show (and by default follow) the log of a run started with launch/tpu/run.sh.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --name NAME --zone ZONE [--worker N|all] [--lines N] [--no-follow] [options]

Prints the last lines of LOG_DIR/RUN_NAME.log on one worker (default 0, normally JAX process 0,
which writes the metrics) or on all of them (each line prefixed with the worker's host name), then follows it until
Ctrl-C. Stopping the display does not stop the run.

$TPU_TARGET_HELP
  --worker N|all         which worker's log (default: 0)
  --lines N              lines of history to show first (default: 100)
  --no-follow            print and exit instead of following
  --run-name NAME        as given to run.sh (default: $OPT_RUN_NAME)
  --log-dir DIR          as given to run.sh (default: $OPT_LOG_DIR)
  --dry-run              print the gcloud command without running it
  -h, --help             this text
USAGE
}

OPT_WORKER=0
OPT_LINES=100
parse_flags "$TPU_TARGET_FLAGS worker lines no-follow? run-name log-dir" "$@"
no_passthrough
require name zone worker lines run-name log-dir
require_run_name
require_int lines "$OPT_LINES"
if [[ $OPT_WORKER != all ]]; then
    [[ $OPT_WORKER =~ ^[0-9]+$ ]] || usage_error "--worker: expected a worker number or 'all', got '$OPT_WORKER'"
fi

log_file="$(shell_quote "$OPT_LOG_DIR")/$OPT_RUN_NAME.log"
if ((OPT_NO_FOLLOW)); then
    remote="tail -n $OPT_LINES $log_file"
else
    remote="tail -n $OPT_LINES -F $log_file"
fi
if [[ $OPT_WORKER == all ]]; then
    remote+=" | sed -u \"s/^/[\$(hostname)] /\""
fi
tpu_ssh "$OPT_WORKER" "$remote"
