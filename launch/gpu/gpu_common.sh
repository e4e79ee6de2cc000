# shellcheck shell=bash disable=SC2034  # the variables here are read by the scripts that source this
# What the GPU scripts share: the trainer command line and its environment. Sourced after
# launch/common.sh.

GPU_TRAINER_FLAGS="config workdir gpus venv env*"
OPT_VENV=$REPO_ROOT/.venv

GPU_TRAINER_HELP="  --config FILE.py:ARG   stage config, e.g. configs/stage1_scp.py:mistral_7b (required)
  --workdir DIR          checkpoints and metrics (required)
  --config.FIELD=VALUE   config overrides, passed to clara-jax train unchanged (repeatable)
  --gpus LIST            CUDA_VISIBLE_DEVICES for the trainer, e.g. 0,1,2,3 (default: all GPUs)
  --env KEY=VALUE        more environment for the trainer, e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=.9 (repeatable)
  --venv DIR             virtualenv with clara_jax[gpu] (default: $OPT_VENV), made by
                         CLARA_JAX_EXTRAS=gpu bash scripts/bootstrap.sh"

# gpu_trainer_command: sets TRAINER to the trainer command (environment, clara-jax train, config and
# workdir); the caller adds its own flags and the pass-through overrides.
gpu_trainer_command() {
    require config workdir venv
    # shellcheck disable=SC2153  # OPT_ENV is set by parse_flags
    require_env_assignments env "${OPT_ENV[@]}"
    if [[ -n $OPT_GPUS && ! $OPT_GPUS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        usage_error "--gpus: expected comma-separated GPU indices like 0,1,2,3, got '$OPT_GPUS'"
    fi
    local clara_jax=$OPT_VENV/bin/clara-jax
    if ((!DRY_RUN)) && [[ ! -x $clara_jax ]]; then
        fail "$clara_jax not found: create the venv with 'CLARA_JAX_EXTRAS=gpu bash scripts/bootstrap.sh' or pass --venv"
    fi
    local -a environment=()
    if [[ -n $OPT_GPUS ]]; then
        environment+=("CUDA_VISIBLE_DEVICES=$OPT_GPUS")
    fi
    environment+=("${OPT_ENV[@]}")
    TRAINER=()
    if ((${#environment[@]})); then
        TRAINER=(env "${environment[@]}")
    fi
    TRAINER+=("$clara_jax" train --config "$OPT_CONFIG" --workdir "$OPT_WORKDIR")
}
