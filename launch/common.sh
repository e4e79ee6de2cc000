# shellcheck shell=bash disable=SC2034  # the variables here are read by the scripts that source this
# Helpers shared by every launch/ script (sourced, never run on its own).
#
# Conventions, so that all scripts behave alike:
#   * `--flag VALUE` and `--flag=VALUE` are the same; switches take no value.
#   * `--help` prints the usage and exits 0; a missing required flag, an unknown flag or a flag
#     without its value exits 2 with a message naming the flag.
#   * every command is printed as `+ CMD` (one line, shell-quoted, so it can be pasted back) before it
#     runs; with `--dry-run` it is only printed, so nothing touches a cluster or a cloud project.
#   * arguments after `--` (and, where a script says so, `--config.FIELD=VALUE` overrides) are passed
#     through unchanged to the command the script wraps.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
PROG=${0#"$LAUNCH_DIR"/}
DRY_RUN=0
PASSTHROUGH=()

usage_error() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

fail() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# shell_quote ARG...: the arguments as one line a POSIX shell splits back into exactly these words
# (the same rule as Python's shlex.quote, so tests can parse what is printed).
shell_quote() {
    local IFS=' ' arg
    local -a words=()
    for arg in "$@"; do
        if [[ -n $arg && $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            words+=("$arg")
        else
            words+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    printf '%s' "${words[*]}"
}

# run CMD...: print the command, then run it unless --dry-run.
run() {
    printf '+ %s\n' "$(shell_quote "$@")"
    if ((DRY_RUN)); then
        return 0
    fi
    "$@"
}

# run_exec CMD...: like run, but the command replaces this shell, so signals sent to this process
# (Slurm's time-limit SIGTERM, Ctrl-C) reach the trainer itself.
run_exec() {
    printf '+ %s\n' "$(shell_quote "$@")"
    if ((DRY_RUN)); then
        exit 0
    fi
    exec "$@"
}

_flag_var() {
    local name=${1^^}
    printf 'OPT_%s' "${name//-/_}"
}

_append() {
    local -n _list=$1
    _list+=("$2")
}

# parse_flags SPEC ARGS...: SPEC is a space-separated list of flag names without dashes; `name` takes a
# value, `name?` is a switch, `name*` may repeat, and the entry `config.*` accepts clara-jax's
# `--config.FIELD=VALUE` overrides into PASSTHROUGH. Each flag sets OPT_NAME (upper case, dashes
# become underscores): a string, 0/1 for a switch, an array for a repeated flag. Flags not given keep
# the value the script set before the call, or start empty.
parse_flags() {
    local entry accept_overrides=0
    local -a entries
    read -ra entries <<<"$1"
    shift
    local -A kinds=()
    for entry in "${entries[@]}"; do
        case $entry in
        config.\*) accept_overrides=1 ;;
        *\?) kinds[${entry%\?}]=switch ;;
        *\*) kinds[${entry%\*}]=list ;;
        *) kinds[$entry]=value ;;
        esac
    done
    local name var
    for name in "${!kinds[@]}"; do
        var=$(_flag_var "$name")
        if [[ ! -v $var ]]; then
            case ${kinds[$name]} in
            switch) printf -v "$var" 0 ;;
            list) declare -ga "$var=()" ;;
            *) printf -v "$var" '' ;;
            esac
        fi
    done
    local arg value has_value
    while (($#)); do
        arg=$1
        has_value=0
        case $arg in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run)
            DRY_RUN=1
            shift
            continue
            ;;
        --)
            shift
            PASSTHROUGH+=("$@")
            break
            ;;
        --config.*)
            ((accept_overrides)) || usage_error "unknown flag ${arg%%=*}"
            if [[ $arg != *=* ]]; then
                (($# >= 2)) || usage_error "${arg} needs a value (--config.FIELD=VALUE)"
                arg="$arg=$2"
                shift
            fi
            PASSTHROUGH+=("$arg")
            shift
            continue
            ;;
        --*=*)
            name=${arg%%=*}
            name=${name#--}
            value=${arg#*=}
            has_value=1
            ;;
        --*) name=${arg#--} ;;
        *) usage_error "unexpected argument '$arg' (flags start with --; pass-through arguments go after --)" ;;
        esac
        [[ -n ${kinds[$name]+set} ]] || usage_error "unknown flag --$name"
        var=$(_flag_var "$name")
        if [[ ${kinds[$name]} == switch ]]; then
            ((has_value == 0)) || usage_error "--$name is a switch and takes no value"
            printf -v "$var" 1
            shift
            continue
        fi
        if ((has_value == 0)); then
            if (($# < 2)) || [[ $2 == --* ]]; then
                usage_error "--$name needs a value (write --$name=VALUE if VALUE starts with --)"
            fi
            value=$2
            shift
        fi
        shift
        if [[ ${kinds[$name]} == list ]]; then
            _append "$var" "$value"
        else
            printf -v "$var" '%s' "$value"
        fi
    done
}

# no_passthrough: for scripts that wrap no single command, refuse arguments after `--`.
no_passthrough() {
    if ((${#PASSTHROUGH[@]})); then
        usage_error "unexpected arguments after --: $(shell_quote "${PASSTHROUGH[@]}")"
    fi
}

# require NAME...: each named flag must have a non-empty value.
require() {
    local name var
    for name in "$@"; do
        var=$(_flag_var "$name")
        [[ -n ${!var-} ]] || usage_error "missing required argument --$name"
    done
}

# require_int NAME VALUE [MIN]: VALUE must be a whole number (at least MIN).
require_int() {
    local name=$1 value=$2 min=${3:-0}
    [[ $value =~ ^[0-9]+$ ]] || usage_error "--$name: expected a whole number, got '$value'"
    ((10#$value >= min)) || usage_error "--$name: expected at least $min, got '$value'"
}

# require_env_assignments NAME VALUE...: each VALUE must look like KEY=VALUE.
require_env_assignments() {
    local name=$1 item
    shift
    for item in "$@"; do
        [[ $item =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--$name: expected KEY=VALUE, got '$item'"
    done
}
