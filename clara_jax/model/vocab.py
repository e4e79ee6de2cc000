"""Growing the vocabulary for CLaRa's special tokens (<MEM*>, <AE>, <ENC>, <SEP>).

New rows start at the mean of the old rows plus a tiny seeded perturbation, as transformers'
`mean_resizing` does (it samples N(mean, 1e-9·cov); we use the covariance's diagonal, which
keeps the cost linear in the width). The official code never trains the new lm_head rows,
and trains only the <MEM*> embedding rows: `trainable_token_ids` says which rows learn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clara_jax.model.decoder import Decoder


def mean_resized_rows(table: jax.Array, n_new: int, key) -> jax.Array:
    old = table.astype(jnp.float32)
    mean = old.mean(axis=0)
    std = jnp.sqrt(1e-9 * old.var(axis=0))
    noise = jax.random.normal(key, (n_new, table.shape[1]), jnp.float32)
    return (mean + noise * std).astype(table.dtype)


def extend_vocabulary(model: Decoder, new_vocab_size: int, *, key, trainable_token_ids=()) -> None:
    """Resize embed (and an untied lm_head) to `new_vocab_size` in place; rows only grow."""
    old = model.config.vocab_size
    if new_vocab_size < old:
        raise ValueError(
            f"new_vocab_size={new_vocab_size} is smaller than the current {old}; "
            "clara_jax never drops rows (token ids of the base must stay valid)"
        )
    n_new = new_vocab_size - old
    if n_new:
        embed_key, head_key = jax.random.split(key)
        embed = model.merged_embedding()
        model.embed.set_value(jnp.concatenate([embed, mean_resized_rows(embed, n_new, embed_key)]))
        if model.lm_head is not None:
            head = model.lm_head[...]
            model.lm_head.set_value(jnp.concatenate([head, mean_resized_rows(head, n_new, head_key)]))
        model.config = model.config.replace(vocab_size=new_vocab_size)
    model.set_trainable_rows(trainable_token_ids)
