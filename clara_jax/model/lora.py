"""Named LoRA adapters over the stacked decoder projections.

CLaRa runs one frozen decoder in three roles (compressor, query reasoner, generator) that
differ only in which adapter is active. Each adapter here is a pytree of stacked factors
`a: [layers, in, rank]`, `b: [layers, rank, out]`; the decoder takes the *weights* of the
active adapter as an ordinary argument, so one compiled function serves every adapter of the
same shape and the base weights are shared, never copied.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clara_jax.model.config import DecoderConfig
from clara_jax.model.field_checks import check_fields

# HF module path of every projection LoRA can target, formatted with the layer index.
PROJECTION_PATHS = {
    "q_proj": "model.layers.{i}.self_attn.q_proj",
    "k_proj": "model.layers.{i}.self_attn.k_proj",
    "v_proj": "model.layers.{i}.self_attn.v_proj",
    "o_proj": "model.layers.{i}.self_attn.o_proj",
    "gate_proj": "model.layers.{i}.mlp.gate_proj",
    "up_proj": "model.layers.{i}.mlp.up_proj",
    "down_proj": "model.layers.{i}.mlp.down_proj",
}

ALL_LINEAR = tuple(PROJECTION_PATHS)


def projection_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (d, cfg.q_dim),
        "k_proj": (d, cfg.kv_dim),
        "v_proj": (d, cfg.kv_dim),
        "o_proj": (cfg.q_dim, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }


PROJECTION_AXES = {
    "q_proj": ("embed", "q_heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("q_heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """PEFT-compatible adapter settings (CLaRa uses r=16, alpha=32, dropout=0.1, all-linear).

    `target_modules` follows PEFT: a string is a regex that must fully match the HF module path
    (e.g. "model.layers.0.self_attn.q_proj"), "all-linear" means every projection, and a list
    names projections by their short name.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = "all-linear"

    def __post_init__(self):
        check_fields(
            ("lora.rank", self.rank, self.rank > 0, "> 0"),
            ("lora.alpha", self.alpha, self.alpha > 0, "> 0"),
            ("lora.dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)"),
        )
        if not isinstance(self.target_modules, str):  # lists from JSON: keep the config hashable
            object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_mask(self, target: str, num_layers: int) -> tuple[bool, ...]:
        """Which layers of `target` carry this adapter."""
        spec = self.target_modules
        if spec == "all-linear":
            return (True,) * num_layers
        if isinstance(spec, str):
            pattern = re.compile(spec)
            return tuple(
                bool(pattern.fullmatch(PROJECTION_PATHS[target].format(i=i))) for i in range(num_layers)
            )
        unknown = sorted(set(spec) - set(PROJECTION_PATHS))
        if unknown:
            raise ValueError(f"unknown LoRA target module(s) {unknown}; known: {sorted(PROJECTION_PATHS)}")
        return (target in spec,) * num_layers


class LoRAAdapter(nnx.Module):
    """One adapter: factors only for the projections (and layers) its config targets."""

    def __init__(self, cfg: DecoderConfig, lora: LoRAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if lora.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {lora.rank}")
        self.lora_config = lora
        masks = {t: lora.layer_mask(t, cfg.num_layers) for t in ALL_LINEAR}
        self.layer_masks = tuple((t, m) for t, m in masks.items() if any(m))
        if not self.layer_masks:
            raise ValueError(f"LoRA target_modules={lora.target_modules!r} matches no projection")
        shapes = projection_shapes(cfg)
        factors = {}
        for target, _ in self.layer_masks:
            d_in, d_out = shapes[target]
            ax_in, ax_out = PROJECTION_AXES[target]
            bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on A
            a = jax.random.uniform(
                rngs.params(), (cfg.num_layers, d_in, lora.rank), param_dtype, -bound, bound
            )
            b = jnp.zeros(
                (cfg.num_layers, lora.rank, d_out), param_dtype
            )  # zero B: a fresh adapter is the identity
            factors[target] = nnx.Dict(
                a=nnx.LoRAParam(a, axes=("layers", ax_in, "lora_rank")),
                b=nnx.LoRAParam(b, axes=("layers", "lora_rank", ax_out)),
            )
        self.factors = nnx.Dict(factors)

    def weights(self) -> dict:
        """The adapter as a plain pytree the pure forward consumes."""
        return {t: {"a": f["a"][...], "b": f["b"][...]} for t, f in self.factors.items()}

    def spec(self) -> AdapterSpec:
        return AdapterSpec(
            scale=self.lora_config.scale, dropout=self.lora_config.dropout, layer_masks=self.layer_masks
        )


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The static (hashable) half of an adapter: what the trace depends on besides its weights."""

    scale: float
    dropout: float
    layer_masks: tuple

    def mask_array(self, target: str):
        return jnp.asarray(dict(self.layer_masks)[target], jnp.float32)


def lora_delta(x, factors, scale, layer_on, dropout_rate, dropout_key):
    """scale * dropout(x) @ a @ b for one layer; zero where the layer is not targeted."""
    if dropout_rate > 0.0 and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
    a = factors["a"].astype(x.dtype)
    b = factors["b"].astype(x.dtype)
    return ((x @ a) @ b) * (scale * layer_on).astype(x.dtype)
