"""clara_jax: CLaRa (continuous latent reasoning for retrieval-augmented generation) in JAX / Flax NNX.

What users call, importable from here. The names load on first use, so `import clara_jax` (and the
`clara-jax` command, which chooses the JAX platform before JAX starts) stays cheap.

    load_inference(model_dir)        a trained model directory, ready to compress, rank and answer
    load_decoder(path, mesh=...)     a transformers checkpoint as a Flax decoder (sharded when given a mesh)
    load_config("stage1_scp:tiny")   a run config, with --config.* overrides and validation
    run_training(config, workdir)    one stage, resumable;  run_demo(workdir): the embedded default
    differentiable_topk(...)         the stage-3 straight-through top-k;  STAGES: what each stage trains
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClaraInference": "clara_jax.inference.clara_model",
    "load_inference": "clara_jax.inference.clara_model",
    "load_clara_model": "clara_jax.interop.model_dir",
    "load_decoder": "clara_jax.interop.hf",
    "save_decoder": "clara_jax.interop.hf",
    "load_tokenizer": "clara_jax.data.tokenizer",
    "differentiable_topk": "clara_jax.model.topk",
    "cosine_scores": "clara_jax.model.topk",
    "retrieval_scores": "clara_jax.model.topk",
    "STAGES": "clara_jax.model.stage_registry",
    "load_config": "clara_jax.training.config",
    "build_model": "clara_jax.training.build",
    "run_training": "clara_jax.training.loop",
    "run_demo": "clara_jax.demo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clara_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
