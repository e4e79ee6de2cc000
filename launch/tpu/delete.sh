#!/usr/bin/env bash
# Delete a TPU VM (its local disks, logs and any local workdir go with it).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=tpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --name NAME --zone ZONE [--project PROJECT] [--yes] [--dry-run]

Deletes the TPU VM with \`gcloud compute tpus tpu-vm delete\`. Stop the run first (launch/tpu/stop.sh)
so its last checkpoint is written.

$TPU_TARGET_HELP
  --yes                  do not ask for confirmation (gcloud --quiet)
  --dry-run              print the gcloud command without running it
  -h, --help             this text
USAGE
}

parse_flags "$TPU_TARGET_FLAGS yes?" "$@"
require name zone

tpu_location_flags
command=(gcloud compute tpus tpu-vm delete "$OPT_NAME" "${TPU_LOCATION[@]}")
if ((OPT_YES)); then
    command+=(--quiet)
fi
run "${command[@]}" "${PASSTHROUGH[@]}"
