# shellcheck shell=bash disable=SC2034  # the variables here are read by the scripts that source this
# What the TPU scripts share: the flags that name a TPU VM and the gcloud calls that reach its workers.
# Sourced after launch/common.sh.

# Flags every TPU script accepts (parse_flags spec fragment).
TPU_TARGET_FLAGS="name zone project gcloud-flag*"

# The same remote layout everywhere: the repository checkout and the run's log and pid files, both
# relative to the worker user's home directory unless absolute.
OPT_REMOTE_DIR=clara_jax
OPT_LOG_DIR=clara_jax_logs
OPT_RUN_NAME=clara

TPU_TARGET_HELP="  --name NAME            TPU VM name (required)
  --zone ZONE            e.g. us-central2-b (required)
  --project PROJECT      Google Cloud project (default: gcloud's configured project)
  --gcloud-flag=FLAG     extra flag for every gcloud call, e.g. --gcloud-flag=--internal-ip or
                         --gcloud-flag=--tunnel-through-iap (repeatable)"

# gcloud's flags for the chosen TPU (location, then --gcloud-flag extras), as an array in TPU_LOCATION.
tpu_location_flags() {
    TPU_LOCATION=("--zone=$OPT_ZONE")
    if [[ -n $OPT_PROJECT ]]; then
        TPU_LOCATION+=("--project=$OPT_PROJECT")
    fi
    TPU_LOCATION+=("${OPT_GCLOUD_FLAG[@]}")
}

# tpu_ssh WORKER REMOTE_COMMAND: run a shell command on one worker (0, 1, ...) or on all of them.
tpu_ssh() {
    local worker=$1 command=$2
    tpu_location_flags
    run gcloud compute tpus tpu-vm ssh "$OPT_NAME" "${TPU_LOCATION[@]}" "--worker=$worker" --command "$command"
}

# A name used inside file names on the workers: letters, digits, dot, dash, underscore.
require_run_name() {
    [[ $OPT_RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] ||
        usage_error "--run-name: expected letters, digits, '.', '_' or '-', got '$OPT_RUN_NAME'"
}

# Remote shell snippet: succeed if the pid is a live process (a zombie left by a finished run counts
# as gone).
# shellcheck disable=SC2016  # expanded on the worker, not here
REMOTE_ALIVE_FN='alive() { kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" | cut -c1)" != Z ]; }'

# join_statements STATEMENT...: one remote shell command line, statements separated by "; ".
join_statements() {
    local joined=$1
    shift
    local statement
    for statement in "$@"; do
        joined+="; $statement"
    done
    printf '%s' "$joined"
}
