"""Where converted models and tokenizers are cached: one place for every layer that caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $CLARA_JAX_CACHE, else ~/.cache/clara_jax."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("CLARA_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "clara_jax"
