"""Which leaves the optimizer sees: the adapters of a stage plus the chosen embedding rows.

Everything else (the base decoder, other adapters) is frozen by construction: it is split
off before differentiation, so neither gradients nor optimizer state exist for it.
"""

from __future__ import annotations

from collections.abc import Iterable

from flax import nnx

from clara_jax.model.decoder import Decoder, TrainableRows


def trainable_filter(adapters: Iterable[str], embed_rows: bool = True):
    """An NNX filter for the LoRA factors of `adapters` (and the trainable rows if asked)."""
    adapters = tuple(adapters)
    parts = [nnx.All(nnx.LoRAParam, nnx.PathContains(name)) for name in adapters]
    if embed_rows:
        parts.append(TrainableRows)
    if not parts:
        return nnx.Nothing
    return nnx.Any(*parts)


def split_trainable(model: Decoder, adapters: Iterable[str], embed_rows: bool = True):
    """(graphdef, trainable_state, frozen_state): differentiate only the middle one."""
    return nnx.split(model, trainable_filter(adapters, embed_rows), ...)
