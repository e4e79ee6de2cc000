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


def extend_vocabulary(
    model: Decoder, new_vocab_size: int, *, key, trainable_token_ids=(), first_new: int | None = None
) -> None:
    """Give the tokens from `first_new` on freshly initialised rows, growing embed (and an
    untied lm_head) to `new_vocab_size` if needed; rows below `first_new` never change.

    `first_new` defaults to the current size. It is smaller when the base's embedding already has
    unused padding rows past its tokenizer (Qwen: 151,936 rows for 151,665 tokens): the CLaRa
    tokens then take those rows, re-initialised like new ones, instead of growing the matrix.
    """
    old = model.config.vocab_size
    first_new = old if first_new is None else first_new
    if new_vocab_size < first_new or first_new > old:
        raise ValueError(
            f"new_vocab_size={new_vocab_size} and first_new={first_new} do not fit a base of {old} rows: "
            "clara_jax never drops rows (token ids of the base must stay valid)"
        )
    size = max(new_vocab_size, old)
    n_new = size - first_new
    if n_new:
        embed_key, head_key = jax.random.split(key)
        embed = model.merged_embedding()[:first_new]
        model.embed.set_value(jnp.concatenate([embed, mean_resized_rows(embed, n_new, embed_key)]))
        if model.lm_head is not None:
            head = model.lm_head[...][:first_new]
            model.lm_head.set_value(jnp.concatenate([head, mean_resized_rows(head, n_new, head_key)]))
        model.config = model.config.replace(vocab_size=size)
    model.set_trainable_rows(trainable_token_ids)
