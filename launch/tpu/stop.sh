#!/usr/bin/env bash
# Stop a run started with launch/tpu/run.sh on every worker: SIGTERM first (the trainer writes a
# checkpoint and exits 0), SIGKILL only if it is still running after the grace period.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --name NAME --zone ZONE [--grace SECONDS] [options]

On every worker (--worker=all), sends SIGTERM to the process group of RUN_NAME (pid from
LOG_DIR/RUN_NAME.pid), waits up to --grace seconds for the checkpoint and exit, then sends SIGKILL if
needed. A worker where the run is not running reports so and succeeds. Resume later with the same
launch/tpu/run.sh command: training continues from the newest checkpoint.

$TPU_TARGET_HELP
  --grace SECONDS        time allowed for the final checkpoint (default: 300)
  --run-name NAME        as given to run.sh (default: $OPT_RUN_NAME)
  --log-dir DIR          as given to run.sh (default: $OPT_LOG_DIR)
  --dry-run              print the gcloud command without running it
  -h, --help             this text
USAGE
}

OPT_GRACE=300
parse_flags "$TPU_TARGET_FLAGS grace run-name log-dir" "$@"
no_passthrough
require name zone grace run-name log-dir
require_run_name
require_int grace "$OPT_GRACE"

run_name=$OPT_RUN_NAME
pid_file="$(shell_quote "$OPT_LOG_DIR")/$run_name.pid"
not_running="if [ ! -f $pid_file ] || ! alive \"\$(cat $pid_file)\"; then"
not_running+=" echo \"$run_name is not running on \$(hostname)\"; rm -f $pid_file; exit 0; fi"
force="if alive \"\$pid\"; then echo \"$run_name still running on \$(hostname) after $OPT_GRACE s: SIGKILL\" >&2;"
force+=" kill -KILL -- -\"\$pid\"; fi"
statements=(
    "$REMOTE_ALIVE_FN"
    "$not_running"
    "pid=\$(cat $pid_file)"
    "echo \"stopping $run_name on \$(hostname) (pid \$pid): SIGTERM, up to $OPT_GRACE s to checkpoint\""
    "kill -TERM -- -\"\$pid\""
    "waited=0"
    "while alive \"\$pid\" && [ \$waited -lt $OPT_GRACE ]; do sleep 1; waited=\$((waited + 1)); done"
    "$force"
    "rm -f $pid_file"
    "echo \"$run_name stopped on \$(hostname)\""
)
tpu_ssh all "$(join_statements "${statements[@]}")"
