#!/usr/bin/env bash
# Train one stage on several GPU nodes: run this once per node (by hand, or by srun with one task per
# node); each process drives all GPUs of its node and joins the others through a coordinator.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --config FILE.py:ARG --workdir DIR --coordinator HOST:PORT --num-nodes N --node-rank I [options]
       srun --ntasks-per-node=1 $PROG --config FILE.py:ARG --workdir DIR [options]

Runs on this node, in the foreground:
  clara-jax train --config ... --workdir ... --no-progress --coordinator HOST:PORT --num-processes N --process-id I
Under Slurm (SLURM_JOB_ID and SLURM_PROCID set) the three values default to: the first host of
SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) with port 61440 + SLURM_JOB_ID % 4096 (or --port),
SLURM_NTASKS, and SLURM_PROCID; flags given explicitly win. Node rank 0 hosts the coordinator, and
--workdir must be on a file system (or bucket) that every node sees. See launch/gpu/slurm.sbatch.

$GPU_TRAINER_HELP
  --coordinator HOST:PORT  address of node rank 0's coordinator service (required outside Slurm)
  --num-nodes N          number of nodes, i.e. of processes (required outside Slurm)
  --node-rank I          this node's rank, 0 .. N-1 (required outside Slurm)
  --port PORT            coordinator port when the host comes from Slurm
  --dry-run              print the command without running it
  -h, --help             this text
Arguments after -- are also passed to clara-jax train.

Example (two nodes, by hand):
  node-a\$ $PROG --config configs/stage1_scp.py:mistral_7b --workdir /shared/runs/s1 \\
               --coordinator node-a:12345 --num-nodes 2 --node-rank 0
  node-b\$ ... the same with --node-rank 1
USAGE
}

# first_slurm_host NODELIST: the first host name of a Slurm node list, e.g. gpu[07-09,12],cpu1 -> gpu07,
# in pure bash so that nothing but this script runs before the trainer.
first_slurm_host() {
    local list=$1 first=""
    local depth=0 char i
    for ((i = 0; i < ${#list}; i++)); do
        char=${list:i:1}
        case $char in
        "[") depth=$((depth + 1)) ;;
        "]") depth=$((depth - 1)) ;;
        ",") ((depth == 0)) && break ;;
        esac
        first+=$char
    done
    # Each bracket group contributes its first value: "[07-09,12]" -> "07" (zero padding kept).
    while [[ $first =~ ^([^[]*)\[([^],-]*)[^]]*\](.*)$ ]]; do
        first=${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}
    done
    printf '%s' "$first"
}

parse_flags "config.* $GPU_TRAINER_FLAGS coordinator num-nodes node-rank port" "$@"

if [[ -n ${SLURM_JOB_ID-} && -n ${SLURM_PROCID-} ]]; then
    if [[ -z $OPT_COORDINATOR ]]; then
        nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST-}}
        [[ -n $nodelist ]] || fail "under Slurm but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set; pass --coordinator"
        [[ $SLURM_JOB_ID =~ ^[0-9]+$ ]] || fail "SLURM_JOB_ID: expected a number, got '$SLURM_JOB_ID'"
        port=${OPT_PORT:-$((61440 + 10#$SLURM_JOB_ID % 4096))}
        OPT_COORDINATOR="$(first_slurm_host "$nodelist"):$port"
    fi
    if [[ -z $OPT_NUM_NODES ]]; then
        OPT_NUM_NODES=${SLURM_NTASKS-}
        nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES-}}
        if [[ -n $OPT_NUM_NODES && -n $nodes && $OPT_NUM_NODES != "$nodes" ]]; then
            fail "expected one task per node (srun --ntasks-per-node=1), got SLURM_NTASKS=$OPT_NUM_NODES on $nodes nodes"
        fi
    fi
    OPT_NODE_RANK=${OPT_NODE_RANK:-$SLURM_PROCID}
fi
require config workdir coordinator num-nodes node-rank
[[ $OPT_COORDINATOR =~ ^[^:[:space:]]+:[0-9]+$ ]] ||
    usage_error "--coordinator: expected HOST:PORT, got '$OPT_COORDINATOR'"
require_int num-nodes "$OPT_NUM_NODES" 1
require_int node-rank "$OPT_NODE_RANK"
((10#$OPT_NODE_RANK < 10#$OPT_NUM_NODES)) ||
    usage_error "--node-rank: expected 0 .. $((OPT_NUM_NODES - 1)) for $OPT_NUM_NODES nodes, got $OPT_NODE_RANK"

gpu_trainer_command
TRAINER+=(--no-progress --coordinator "$OPT_COORDINATOR" --num-processes "$OPT_NUM_NODES" --process-id "$OPT_NODE_RANK")
run_exec "${TRAINER[@]}" "${PASSTHROUGH[@]}"
