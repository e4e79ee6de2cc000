"""What CLaRa adds to a base decoder: its special-token rows and one LoRA adapter per role.

One recipe for training (training/build.py), `clara-jax compile`'s abstract model, the tests and
the benchmarks, so the same seeds give the same rows and adapters wherever a model is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from clara_jax.model.clara import ROLES
from clara_jax.model.decoder import Decoder
from clara_jax.model.lora import LoRAConfig
from clara_jax.model.vocab import extend_vocabulary


def add_adapters(model: Decoder, loras: Mapping[str, LoRAConfig], seeds: Sequence[int]) -> None:
    """Add a fresh adapter named by each key of `loras` with its LoRA config, the i-th seeded
    `seeds[i]` (a loader that then fills the factors from a file passes any seeds)."""
    for (role, lora), seed in zip(loras.items(), seeds, strict=True):
        model.add_adapter(role, lora, rngs=nnx.Rngs(seed))


def add_clara_parts(
    model: Decoder,
    *,
    vocab_size: int,
    mem_token_ids: Sequence[int],
    lora: LoRAConfig | Mapping[str, LoRAConfig],
    seed: int,
    first_new: int | None = None,
    roles: Sequence[str] = ROLES,
    adapter_seeds: Sequence[int] | None = None,
) -> None:
    """Extend the vocabulary to `vocab_size` (rows from `first_new` on drawn from `seed`, the
    <MEM*> rows `mem_token_ids` trainable) and add a fresh `lora` adapter for each role, the i-th
    seeded `seed + 1 + i` unless `adapter_seeds` gives the seeds.

    `lora` may map each role to its own config (a saved model's adapters); its keys are then the
    roles, in order, and `roles` is not used."""
    extend_vocabulary(
        model,
        vocab_size,
        key=jax.random.key(seed),
        trainable_token_ids=tuple(mem_token_ids),
        first_new=first_new,
    )
    loras = dict(lora) if isinstance(lora, Mapping) else {role: lora for role in roles}
    if adapter_seeds is None:
        adapter_seeds = [seed + 1 + i for i in range(len(loras))]
    add_adapters(model, loras, adapter_seeds)
