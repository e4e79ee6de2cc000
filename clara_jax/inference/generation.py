"""KV-cache decoding: one prefill, then single-token steps in an on-device while loop.

Prompts are left-padded so every row writes the same cache slot each step; RoPE positions
come from the attention mask, so padding never shifts a row's positions (this matches
transformers' `generate`). Prompts may be token ids or embeddings (CLaRa's spliced vectors).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clara_jax.model.decoder import Decoder, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_p < 1 keeps the smallest nucleus reaching p."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_ids: tuple = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def select_token(logits: jax.Array, sampling: SamplingConfig, key) -> jax.Array:
    """Next token per row from float32 logits [B, V]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        sorted_logits = jnp.where(before < sampling.top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "adapter"))
def _generate(graphdef, state, input_ids, inputs_embeds, attention_mask, rng, *, sampling, adapter):
    model = nnx.merge(graphdef, state)
    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, prompt_len = prompt.shape[:2]
    cache = KVCache.init(model.config, batch, prompt_len + sampling.max_new_tokens, model.policy.compute)
    hidden, cache = model.hidden_states(
        input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, adapter=adapter, cache=cache
    )
    eos = jnp.asarray(sampling.eos_token_ids, jnp.int32)

    def pick(hidden_last, done, key):
        token = select_token(model.logits(hidden_last), sampling, key)
        token = jnp.where(done, sampling.pad_token_id, token)
        return token, done | jnp.isin(token, eos)

    rng, key = jax.random.split(rng)
    token, done = pick(hidden[:, -1], jnp.zeros((batch,), bool), key)
    out = jnp.full((batch, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < sampling.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, cache, done, out, rng = carry
        rng, key = jax.random.split(rng)
        hidden, cache = model.hidden_states(token[:, None], adapter=adapter, cache=cache)
        token, done = pick(hidden[:, -1], done, key)
        return step + 1, token, cache, done, out.at[:, step].set(token), rng

    carry = (jnp.int32(1), token, cache, done, out, rng)
    _, _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
    return out


def generate(
    model: Decoder,
    input_ids=None,
    attention_mask=None,
    *,
    inputs_embeds=None,
    sampling: SamplingConfig = SamplingConfig(),
    adapter: str | None = None,
    rng=None,
) -> jax.Array:
    """New tokens [B, max_new_tokens]; rows that stopped at EOS are filled with pad."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if attention_mask is None:
        attention_mask = jnp.ones(prompt.shape[:2], jnp.int32)
    if sampling.temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        input_ids,
        inputs_embeds,
        jnp.asarray(attention_mask),
        rng,
        sampling=sampling,
        adapter=adapter,
    )


def eos_ids(value) -> tuple:
    """Normalise an HF-style eos_token_id (int, list or None) to a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, Sequence) else (int(value),)
