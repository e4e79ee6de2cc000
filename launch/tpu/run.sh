#!/usr/bin/env bash
# Start one training stage on every worker of a TPU VM, detached from the SSH session, so that a
# dropped connection does not stop it. Each worker appends to its own log file on its own disk.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --name NAME --zone ZONE --config FILE.py:PRESET --workdir DIR [options] [--config.FIELD=VALUE ...]

On every worker (--worker=all) runs, from the checkout made by launch/tpu/setup.sh:
  setsid nohup .venv/bin/clara-jax train --config CONFIG --workdir WORKDIR --multihost auto --no-progress ...
in a new session (immune to the SSH session's hang-up), appending stdout and stderr to
LOG_DIR/RUN_NAME.log and writing the process id to LOG_DIR/RUN_NAME.pid. JAX finds the other
workers by itself (--multihost auto). A worker where RUN_NAME is still running refuses to start it again.
Follow it with launch/tpu/logs.sh, stop it with launch/tpu/stop.sh (it checkpoints before exiting).

$TPU_TARGET_HELP
  --config FILE.py:ARG   stage config, relative to the checkout, e.g. configs/stage1_scp.py:mistral_7b (required)
  --workdir DIR          checkpoints and metrics; on a pod slice with several hosts use a folder that all
                         of them share, e.g. a bucket mounted with gcsfuse at /mnt/BUCKET on every worker:
                         /mnt/BUCKET/runs/stage1 (gs:// URLs are refused until cloud paths land) (required)
  --config.FIELD=VALUE   config overrides, passed to clara-jax train unchanged (repeatable)
  --env KEY=VALUE        environment variable for the trainer, e.g. LIBTPU_INIT_ARGS=... (repeatable)
  --run-name NAME        names the log and pid files (default: $OPT_RUN_NAME)
  --remote-dir DIR       checkout on the workers, relative to the home directory (default: $OPT_REMOTE_DIR)
  --log-dir DIR          log and pid directory on the workers (default: $OPT_LOG_DIR)
  --dry-run              print the gcloud command without running it
  -h, --help             this text
Arguments after -- are also passed to clara-jax train.

Example:
  $PROG --name clara-v4 --zone us-central2-b --config configs/stage1_scp.py:mistral_7b \\
      --workdir /mnt/my-bucket/runs/stage1 --config.model.path /home/me/Mistral-7B-Instruct-v0.2
USAGE
}

parse_flags "$TPU_TARGET_FLAGS config.* config workdir env* run-name remote-dir log-dir" "$@"
require name zone config workdir run-name remote-dir log-dir
require_run_name
require_env_assignments env "${OPT_ENV[@]}"

trainer=(.venv/bin/clara-jax train --config "$OPT_CONFIG" --workdir "$OPT_WORKDIR" --multihost auto --no-progress
    "${PASSTHROUGH[@]}")
if ((${#OPT_ENV[@]})); then
    trainer=(env "${OPT_ENV[@]}" "${trainer[@]}")
fi
run_name=$OPT_RUN_NAME
refuse_twice="if [ -f \"\$logs/$run_name.pid\" ] && alive \"\$(cat \"\$logs/$run_name.pid\")\"; then"
refuse_twice+=" echo \"$run_name is already running on \$(hostname)\" >&2; exit 1; fi"
start="setsid nohup $(shell_quote "${trainer[@]}") >> \"\$logs/$run_name.log\" 2>&1 < /dev/null &"
start+=" echo \$! > \"\$logs/$run_name.pid\""
statements=(
    "set -e"
    "$REMOTE_ALIVE_FN"
    "mkdir -p $(shell_quote "$OPT_LOG_DIR")"
    "logs=\$(cd $(shell_quote "$OPT_LOG_DIR") && pwd)"
    "$refuse_twice"
    "cd $(shell_quote "$OPT_REMOTE_DIR")"
    "$start"
    "echo \"$run_name started on \$(hostname): pid \$!, log \$logs/$run_name.log\""
)
remote=$(join_statements "${statements[@]}")
tpu_ssh all "$remote"
