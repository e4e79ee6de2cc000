"""The Llama-family decoder that plays every CLaRa role.

Layer weights are stacked along a leading `layers` axis and run with `lax.scan`, so compile
time does not grow with depth. The forward is a pure function of arrays
(`layer_stack` / `attention`), and the NNX module only owns the variables: a jitted step can
call the decoder several times with different adapters without copying the base weights.

Numerics follow transformers: RMSNorm and softmax in float32, rotate-half RoPE, logits in
float32. Inputs may be token ids or embeddings (CLaRa splices compressed vectors in), with an
attention mask that allows left padding, and explicit or mask-derived positions.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clara_jax.model.activation_sharding import shard_as
from clara_jax.model.config import DecoderConfig
from clara_jax.model.lora import (
    ALL_LINEAR,
    PROJECTION_AXES,
    AdapterSpec,
    LoRAAdapter,
    LoRAConfig,
    lora_delta,
    projection_shapes,
)
from clara_jax.model.rope import apply_rotary, attention_scaling, position_frequencies, rotary_tables

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully padded rows stay NaN-free

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    """param: storage dtype of the frozen base; compute: matmul dtype. Norms, softmax and
    logits always run in float32."""

    param: jnp.dtype = jnp.float32
    compute: jnp.dtype = jnp.float32

    @classmethod
    def parse(cls, spec: str | DTypePolicy) -> DTypePolicy:
        """'float32', 'bfloat16', or 'p=float32,c=bfloat16'."""
        if isinstance(spec, DTypePolicy):
            return spec
        if "=" not in spec:
            return cls(jnp.dtype(spec), jnp.dtype(spec))
        parts = dict(kv.split("=") for kv in spec.split(","))
        return cls(jnp.dtype(parts.get("p", "float32")), jnp.dtype(parts.get("c", "float32")))


class KVCache(NamedTuple):
    """Decoding state. `index` is the next slot to write (shared by the batch, prompts are
    left-padded); `next_position` is each row's next RoPE position."""

    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array
    key_mask: jax.Array  # [batch, slots] bool: slot holds a real token
    index: jax.Array  # [] int32
    next_position: jax.Array  # [batch] int32

    @classmethod
    def init(cls, cfg: DecoderConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, slots), bool),
            jnp.zeros((), jnp.int32),
            jnp.zeros((batch,), jnp.int32),
        )


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


# Queries per attention block: the scores of one block ([B, KV, G, block, T] float32) are the
# largest live buffer of the step, so blocks bound the memory the way flash attention does.
ATTENTION_BLOCK = 128


def _attention_block(q, k, v, allowed):
    b, s, h, dh = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, dh)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * (dh**-0.5)
    scores = jnp.where(allowed[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h * dh)


# Why recompute: saving the probabilities for the backward pass costs layers x B x H x S x T floats
# (522 MB of the 1.26 GB of temporaries of the official-benchmark stage-1 step, plus a head-broadcast
# copy of the mask); recomputing them from q, k, v costs one more QK^T and softmax per layer.
_attention_block_remat = jax.checkpoint(_attention_block)


def attention(q, k, v, allowed, block: int = ATTENTION_BLOCK):
    """Grouped-query attention. q [B,S,H,Dh], k/v [B,T,KV,Dh], allowed [B,S,T] bool.

    Queries run in blocks of `block` rows (one `lax.map` step each) and every block's scores and
    probabilities are recomputed in the backward pass instead of saved: peak memory grows with
    block x T, not S x T, and the saved activations are only q, k, v and the mask."""
    b, s, h, dh = q.shape
    if s <= block:
        return _attention_block_remat(q, k, v, allowed)
    n = -(-s // block)
    pad = n * block - s
    blocks = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
        b, n, block, *x.shape[2:]
    ).swapaxes(0, 1)
    out = jax.lax.map(lambda qa: _attention_block_remat(qa[0], k, v, qa[1]), (blocks(q), blocks(allowed)))
    return out.swapaxes(0, 1).reshape(b, n * block, h * dh)[:, :s]


def _project(x, p, name, lora, lora_spec, layer_key, bias=False):
    y = x @ p[name].astype(x.dtype)
    if bias:
        y = y + p[name + "_bias"].astype(x.dtype)
    if lora is not None and name in lora:
        key = None if layer_key is None else jax.random.fold_in(layer_key, ALL_LINEAR.index(name))
        y = y + lora_delta(x, lora[name], lora_spec.scale, lora["_on"][name], lora_spec.dropout, key)
    return y


def layer_stack(
    cfg: DecoderConfig,
    x,
    layers,
    *,
    positions,
    allowed,
    q_slots,
    k_slots,
    lora=None,
    lora_spec: AdapterSpec | None = None,
    dropout_rng=None,
    cache=None,
    remat: str = "none",
):
    """Run every decoder layer over x [B,S,D]; returns (x, new_k, new_v).

    `allowed` is the causal + padding mask [B,S,T]; sliding windows are applied per layer from
    the slot indices (as transformers does: by cache position, not RoPE position).
    """
    inv_freq = position_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, positions)
    cos, sin = rotary_tables(positions, inv_freq, attention_scaling(cfg.rope_scaling))
    b, s, _ = x.shape
    windows = jnp.asarray(cfg.sliding_windows, jnp.int32)
    if lora is not None:
        lora = dict(lora, _on={t: lora_spec.mask_array(t) for t in lora})
    layer_keys = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_layers)

    def body(h, xs):
        p, window, lw, key, kc, vc = xs
        attn_in = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
        q = _project(attn_in, p, "q_proj", lw, lora_spec, key, cfg.qkv_bias).reshape(
            b, s, cfg.num_heads, cfg.head_dim
        )
        q = shard_as(q, ("batch", "seq", "act_heads", None))
        k = _project(attn_in, p, "k_proj", lw, lora_spec, key, cfg.qkv_bias).reshape(
            b, s, cfg.num_kv_heads, cfg.head_dim
        )
        v = _project(attn_in, p, "v_proj", lw, lora_spec, key, cfg.qkv_bias).reshape(
            b, s, cfg.num_kv_heads, cfg.head_dim
        )
        if cfg.qk_norm:
            q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if kc is not None:  # write this chunk into the cache, attend over every slot
            kc = jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), cache.index, axis=1)
            vc = jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), cache.index, axis=1)
            k_all, v_all = kc.astype(h.dtype), vc.astype(h.dtype)
        else:
            k_all, v_all = k, v
        in_window = (window == 0) | (k_slots[None, :] > q_slots[:, None] - window)
        attn = shard_as(attention(q, k_all, v_all, allowed & in_window[None]), ("batch", "seq", "act_heads"))
        h = h + _project(attn, p, "o_proj", lw, lora_spec, key, cfg.o_bias)
        h = shard_as(h, ("batch", "seq", "act_embed"))
        mlp_in = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)
        gate = _project(mlp_in, p, "gate_proj", lw, lora_spec, key, cfg.mlp_bias)
        up = _project(mlp_in, p, "up_proj", lw, lora_spec, key, cfg.mlp_bias)
        inner = shard_as(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
        h = h + _project(inner, p, "down_proj", lw, lora_spec, key, cfg.mlp_bias)
        return shard_as(h, ("batch", "seq", "act_embed")), (kc, vc)

    policy = REMAT_POLICIES[remat]
    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    xs = (
        layers,
        windows,
        lora,
        layer_keys,
        None if cache is None else cache.k,
        None if cache is None else cache.v,
    )
    x, (new_k, new_v) = jax.lax.scan(body, x, xs)
    return x, new_k, new_v


def _layer_param_specs(cfg: DecoderConfig) -> dict[str, tuple[tuple, tuple]]:
    """name -> (per-layer shape, logical axes without the leading 'layers')."""
    d = cfg.hidden_size
    specs = {"attn_norm": ((d,), ("norm",)), "mlp_norm": ((d,), ("norm",))}
    for name, (d_in, d_out) in projection_shapes(cfg).items():
        specs[name] = ((d_in, d_out), PROJECTION_AXES[name])
    biases = [
        ("q_proj", cfg.qkv_bias),
        ("k_proj", cfg.qkv_bias),
        ("v_proj", cfg.qkv_bias),
        ("o_proj", cfg.o_bias),
        ("gate_proj", cfg.mlp_bias),
        ("up_proj", cfg.mlp_bias),
        ("down_proj", cfg.mlp_bias),
    ]
    for name, on in biases:
        if on:
            (_, d_out), (_, ax_out) = specs[name]
            specs[name + "_bias"] = ((d_out,), (ax_out,))
    if cfg.qk_norm:
        specs["q_norm"] = ((cfg.head_dim,), ("norm",))
        specs["k_norm"] = ((cfg.head_dim,), ("norm",))
    return specs


class TrainableRows(nnx.Param):
    """Embedding rows that train while the rest of the vocabulary stays frozen (CLaRa's <MEM*>)."""


class Decoder(nnx.Module):
    """Frozen base weights + named LoRA adapters + optionally trainable embedding rows."""

    def __init__(
        self,
        config: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype: str | DTypePolicy = "float32",
        remat: str = "none",
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        self.config = config
        self.policy = DTypePolicy.parse(dtype)
        self.remat = remat
        pd = self.policy.param
        normal = jax.nn.initializers.normal(0.02)
        v, d, n = config.vocab_size, config.hidden_size, config.num_layers
        self.embed = nnx.Param(normal(rngs.params(), (v, d), pd), axes=("vocab", "embed"))
        layers = {}
        for name, (shape, axes) in _layer_param_specs(config).items():
            if name.endswith("norm"):
                value = jnp.ones((n,) + shape, pd)
            elif name.endswith("_bias"):
                value = jnp.zeros((n,) + shape, pd)
            else:
                value = normal(rngs.params(), (n,) + shape, pd)
            layers[name] = nnx.Param(value, axes=("layers",) + axes)
        self.layers = nnx.Dict(layers)
        self.final_norm = nnx.Param(jnp.ones((d,), pd), axes=("norm",))
        self.lm_head = nnx.data(
            None
            if config.tie_word_embeddings
            else nnx.Param(normal(rngs.params(), (v, d), pd), axes=("vocab", "embed"))
        )
        self.adapters = nnx.Dict()
        self.trainable_token_ids = ()
        self.embed_rows = TrainableRows(jnp.zeros((0, d), jnp.float32), axes=(None, "embed"))

    # ----------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, lora: LoRAConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        self.adapters[name] = LoRAAdapter(self.config, lora, rngs=rngs, param_dtype=dtype)

    def set_trainable_rows(self, token_ids) -> None:
        """Let the embeddings of `token_ids` train (their current values are the start point)."""
        token_ids = tuple(int(t) for t in token_ids)
        bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad} are outside the vocabulary (size {self.config.vocab_size})")
        self.embed.set_value(self.merged_embedding())
        self.trainable_token_ids = token_ids
        rows = self.embed[...][jnp.asarray(token_ids, jnp.int32)] if token_ids else self.embed[...][:0]
        self.embed_rows = TrainableRows(rows.astype(jnp.float32), axes=(None, "embed"))

    def merged_embedding(self) -> jax.Array:
        """The full embedding table with trained rows written back (for export)."""
        table = self.embed[...]
        if self.trainable_token_ids:
            table = table.at[jnp.asarray(self.trainable_token_ids)].set(
                self.embed_rows[...].astype(table.dtype)
            )
        return table

    # ----------------------------------------------------------------------- forward
    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed[...][input_ids].astype(self.policy.compute)
        if self.trainable_token_ids:
            onehot = input_ids[..., None] == jnp.asarray(self.trainable_token_ids, jnp.int32)
            rows = onehot.astype(self.policy.compute) @ self.embed_rows[...].astype(self.policy.compute)
            x = jnp.where(onehot.any(-1, keepdims=True), rows, x)
        return x

    def hidden_states(
        self,
        input_ids=None,
        *,
        inputs_embeds=None,
        attention_mask=None,
        positions=None,
        adapter: str | LoRAAdapter | None = None,
        dropout_rng=None,
        cache: KVCache | None = None,
    ):
        """Post-final-norm hidden states [B,S,D] (and the updated cache when one is given).

        `adapter` is a name in `self.adapters` or a `LoRAAdapter` passed in directly: a jitted
        function that takes the adapter as an argument compiles once for all same-shaped adapters.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = (
            self.embed_tokens(input_ids)
            if inputs_embeds is None
            else inputs_embeds.astype(self.policy.compute)
        )
        x = shard_as(x, ("batch", "seq", "act_embed"))
        b, s = x.shape[:2]
        mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        offsets = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
        if cache is None:
            if positions is None:
                positions = jnp.maximum(offsets, 0)
            q_slots = k_slots = jnp.arange(s)
            key_mask = mask
        else:
            if positions is None:
                positions = cache.next_position[:, None] + jnp.maximum(offsets, 0)
            q_slots = cache.index + jnp.arange(s)
            k_slots = jnp.arange(cache.key_mask.shape[1])
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, mask, cache.index, axis=1)
        allowed = (k_slots[None, :] <= q_slots[:, None])[None] & key_mask[:, None, :]

        lora = spec = None
        if isinstance(adapter, str):
            if adapter not in self.adapters:
                raise KeyError(f"no adapter named {adapter!r}; have {sorted(self.adapters)}")
            adapter = self.adapters[adapter]
        if adapter is not None:
            lora, spec = adapter.weights(), adapter.spec()
        layers = {k: v[...] for k, v in self.layers.items()}
        x, new_k, new_v = layer_stack(
            self.config,
            x,
            layers,
            positions=positions,
            allowed=allowed,
            q_slots=q_slots,
            k_slots=k_slots,
            lora=lora,
            lora_spec=spec,
            dropout_rng=dropout_rng,
            cache=cache,
            remat=self.remat,
        )
        x = rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)
        if cache is None:
            return x
        new_cache = KVCache(
            new_k, new_v, key_mask, cache.index + s, cache.next_position + mask.sum(axis=1, dtype=jnp.int32)
        )
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits over the full vocabulary."""
        head = self.embed[...] if self.lm_head is None else self.lm_head[...]
        out = jnp.einsum(
            "...d,vd->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32
        )
        if self.lm_head is None and self.trainable_token_ids:  # tied: trained rows are output rows too
            rows = self.embed_rows[...].astype(hidden.dtype)
            out = out.at[..., jnp.asarray(self.trainable_token_ids)].set(
                jnp.einsum("...d,vd->...v", hidden, rows, preferred_element_type=jnp.float32)
            )
        return shard_as(out, ("batch", "seq", "act_vocab")) if out.ndim == 3 else out

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        *,
        inputs_embeds=None,
        positions=None,
        adapter: str | None = None,
        dropout_rng=None,
    ) -> jax.Array:
        hidden = self.hidden_states(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            positions=positions,
            adapter=adapter,
            dropout_rng=dropout_rng,
        )
        return self.logits(hidden)
