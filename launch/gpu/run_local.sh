#!/usr/bin/env bash
# Train one stage on this machine's GPUs: one process that drives every visible GPU (JAX shards the
# batch and the parameters over all of them; no multi-host setup is needed).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

usage() {
    cat <<USAGE
Usage: $PROG --config FILE.py:ARG --workdir DIR [options] [--config.FIELD=VALUE ...]

Runs \`clara-jax train\` in the foreground with all local GPUs (or those of --gpus). Install first with
  CLARA_JAX_EXTRAS=gpu bash scripts/bootstrap.sh      # clara_jax[gpu] = jax[cuda12]
Ctrl-C or SIGTERM makes the trainer checkpoint and exit; the same command resumes.

$GPU_TRAINER_HELP
  --dry-run              print the command without running it
  -h, --help             this text
Arguments after -- are also passed to clara-jax train.

Example:
  $PROG --config configs/stage1_scp.py:qwen2_5_0_5b --workdir runs/s1 --gpus 0,1 \\
      --config.model.path /models/Qwen2.5-0.5B-Instruct --config.data.train data/stage1_train.jsonl
USAGE
}

parse_flags "config.* $GPU_TRAINER_FLAGS" "$@"
gpu_trainer_command
run_exec "${TRAINER[@]}" "${PASSTHROUGH[@]}"
