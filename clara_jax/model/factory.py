"""What CLaRa adds to a base decoder: its special-token rows and one LoRA adapter per role.

One recipe for training (training/build.py), `clara-jax compile`'s abstract model, the tests and
the benchmarks, so the same seeds give the same rows and adapters wherever a model is made.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from clara_jax.model.clara import ROLES
from clara_jax.model.decoder import Decoder
from clara_jax.model.lora import LoRAConfig
from clara_jax.model.vocab import extend_vocabulary


def add_clara_parts(
    model: Decoder,
    *,
    vocab_size: int,
    mem_token_ids: Sequence[int],
    lora: LoRAConfig,
    seed: int,
    first_new: int | None = None,
    roles: Sequence[str] = ROLES,
    adapter_seeds: Sequence[int] | None = None,
) -> None:
    """Extend the vocabulary to `vocab_size` (rows from `first_new` on drawn from `seed`, the
    <MEM*> rows `mem_token_ids` trainable) and add a fresh `lora` adapter for each role, the i-th
    seeded `seed + 1 + i` unless `adapter_seeds` gives the seeds."""
    extend_vocabulary(
        model,
        vocab_size,
        key=jax.random.key(seed),
        trainable_token_ids=tuple(mem_token_ids),
        first_new=first_new,
    )
    if adapter_seeds is None:
        adapter_seeds = [seed + 1 + i for i in range(len(roles))]
    for role, adapter_seed in zip(roles, adapter_seeds, strict=True):
        model.add_adapter(role, lora, rngs=nnx.Rngs(adapter_seed))
