#!/usr/bin/env bash
# Create a TPU VM (a single host or a whole pod slice) for clara_jax training.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME [options] [-- GCLOUD_FLAGS...]

Creates the TPU VM with \`gcloud compute tpus tpu-vm create\`. Next: launch/tpu/setup.sh.

$TPU_TARGET_HELP
  --accelerator-type T   e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-16, v6e-8 (required)
  --version RUNTIME      TPU software version, e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
                         v2-alpha-tpuv6e (v6e) (required)
  --spot                 Spot capacity (cheaper, may be reclaimed at any time)
  --preemptible          preemptible capacity (the older form of --spot)
  --dry-run              print the gcloud command without running it
  -h, --help             this text
Anything after -- is appended to the gcloud command (e.g. -- --network=my-net --data-disk=...).

Example:
  $PROG --name clara-v4 --zone us-central2-b --accelerator-type v4-32 --version tpu-ubuntu2204-base --spot
USAGE
}

parse_flags "$TPU_TARGET_FLAGS accelerator-type version spot? preemptible?" "$@"
require name zone accelerator-type version
if ((OPT_SPOT && OPT_PREEMPTIBLE)); then
    usage_error "--spot and --preemptible exclude each other; choose one"
fi

tpu_location_flags
command=(gcloud compute tpus tpu-vm create "$OPT_NAME" "${TPU_LOCATION[@]}"
    "--accelerator-type=$OPT_ACCELERATOR_TYPE" "--version=$OPT_VERSION")
if ((OPT_SPOT)); then
    command+=(--spot)
fi
if ((OPT_PREEMPTIBLE)); then
    command+=(--preemptible)
fi
run "${command[@]}" "${PASSTHROUGH[@]}"
