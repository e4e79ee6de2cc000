#!/usr/bin/env bash
# Put the clara_jax code on every worker of a TPU VM and install it there (scripts/bootstrap.sh with
# the `tpu` extra). Idempotent: re-run it after changing the code.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --name NAME --zone ZONE [--repo-url URL [--ref REF] | --source DIR] [options]

Copies the code to all workers (--worker=all), then runs scripts/bootstrap.sh on each with
CLARA_JAX_EXTRAS=tpu, which creates REMOTE_DIR/.venv and installs clara_jax[tpu] (jax[tpu]).
Two ways to get the code there:
  default        pack the local checkout (--source, default this repository; without .git, .venv,
                 runs/, caches) into a tarball, copy it with \`gcloud compute tpus tpu-vm scp\`, unpack it
  --repo-url     every worker clones URL (or fetches, if already cloned) and checks out --ref

$TPU_TARGET_HELP
  --repo-url URL         clone this git repository on the workers instead of copying the local tree
  --ref REF              branch, tag or commit to check out with --repo-url (default: main)
  --source DIR           local checkout to copy (default: $REPO_ROOT)
  --remote-dir DIR       checkout on the workers, relative to the home directory (default: $OPT_REMOTE_DIR)
  --extras LIST          clara_jax extras to install (default: tpu)
  --python PYTHON        interpreter for the venv; clara_jax needs Python >= 3.11, and Ubuntu 22.04 TPU
                         images ship 3.10 (e.g. --apt-install "python3.11 python3.11-venv" --python python3.11)
  --apt-install PKGS     Debian packages to install first with sudo apt-get (space-separated)
  --skip-check           do not end with the JAX device check (it needs the TPU, so it fails while a
                         run holds it)
  --dry-run              print the commands without running them
  -h, --help             this text

Example:
  $PROG --name clara-v4 --zone us-central2-b --apt-install "python3.11 python3.11-venv" --python python3.11
USAGE
}

OPT_REF=main
OPT_EXTRAS=tpu
OPT_PYTHON=python3
OPT_SOURCE=$REPO_ROOT
parse_flags "$TPU_TARGET_FLAGS repo-url ref source remote-dir extras python apt-install skip-check?" "$@"
no_passthrough
require name zone remote-dir extras python
[[ $OPT_APT_INSTALL =~ ^[A-Za-z0-9.+:\ _-]*$ ]] ||
    usage_error "--apt-install: expected space-separated Debian package names, got '$OPT_APT_INSTALL'"

remote_dir=$(shell_quote "$OPT_REMOTE_DIR")
steps=()
if [[ -n $OPT_APT_INSTALL ]]; then
    # Package names are validated above and must stay separate words, hence no quoting here.
    steps+=("sudo apt-get update -qq"
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $OPT_APT_INSTALL")
fi

if [[ -n $OPT_REPO_URL ]]; then
    url=$(shell_quote "$OPT_REPO_URL")
    ref=$(shell_quote "$OPT_REF")
    steps+=("{ [ -d $remote_dir/.git ] || git clone --quiet $url $remote_dir; }"
        "git -C $remote_dir fetch --quiet origin $ref"
        "git -C $remote_dir checkout --quiet --detach FETCH_HEAD")
else
    [[ -d $OPT_SOURCE && -f $OPT_SOURCE/setup.py && -f $OPT_SOURCE/scripts/bootstrap.sh ]] ||
        usage_error "--source: expected a clara_jax checkout (with setup.py and scripts/bootstrap.sh), got '$OPT_SOURCE'"
    tarball_name=clara_jax-src.tar.gz
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    run tar -czf "$staging/$tarball_name" --exclude=.git --exclude=.venv --exclude=runs \
        --exclude=__pycache__ '--exclude=*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache \
        -C "$OPT_SOURCE" .
    tpu_location_flags
    run gcloud compute tpus tpu-vm scp "$staging/$tarball_name" "$OPT_NAME:$tarball_name" \
        "${TPU_LOCATION[@]}" --worker=all
    steps+=("mkdir -p $remote_dir"
        "tar -xzf $tarball_name -C $remote_dir"
        "rm -f $tarball_name")
fi

steps+=("cd $remote_dir"
    "CLARA_JAX_EXTRAS=$(shell_quote "$OPT_EXTRAS") PYTHON=$(shell_quote "$OPT_PYTHON") bash scripts/bootstrap.sh")
if ((!OPT_SKIP_CHECK)); then
    # Every worker at once, as JAX on a pod slice needs: prints process index, global device count, platform.
    steps+=(".venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)'")
fi

tpu_ssh all "$(join_statements "set -e" "${steps[@]}")"
