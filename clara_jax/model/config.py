"""Decoder hyper-parameters, read from (and named after) a transformers `config.json`.

One frozen dataclass covers the Llama family (Llama, Mistral, Qwen2, Qwen3, the
tied-embedding SmolLM2, and Phi-3/Phi-4-mini, whose fused qkv/gate_up weights are split at
load): the differences between them are switches here, not subclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position), ("linear", factor)
    # or ("longrope", short_factors, long_factors, original_max_position, attention_factor).
    rope_scaling: tuple = ("default",)
    # Fraction of each head that RoPE rotates (Phi-4-mini: 0.75); the rest passes through.
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # One entry per layer: the sliding-window size, or 0 for full causal attention.
    sliding_windows: tuple = ()
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | tuple | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.sliding_windows) != self.num_layers:
            problems.append(
                f"{len(self.sliding_windows)} sliding-window entries for {self.num_layers} layers"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            problems.append(
                f"rotary dim int(head_dim*partial_rotary_factor)={self.rotary_dim} must be even and in "
                f"(0, head_dim={self.head_dim}]"
            )
        if self.rope_scaling[0] not in SUPPORTED_ROPE_TYPES:
            problems.append(
                f"rope type {self.rope_scaling[0]!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        elif self.rope_scaling[0] == "longrope":
            for label, factors in (
                ("short_factor", self.rope_scaling[1]),
                ("long_factor", self.rope_scaling[2]),
            ):
                if len(factors) != self.rotary_dim // 2:
                    problems.append(
                        f"longrope {label} has {len(factors)} entries; rotary dim {self.rotary_dim} needs "
                        f"{self.rotary_dim // 2}"
                    )
        if problems:
            raise ValueError("invalid DecoderConfig: " + "; ".join(problems))

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head, truncated like transformers' int(head_dim * factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **kw) -> DecoderConfig:
        return dataclasses.replace(self, **kw)

    def param_count(self) -> int:
        d, f, n = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n * per_layer + embed + d

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json") -> DecoderConfig:
        """Map a transformers config (v4 or v5 spelling) onto ours; refuse what we do not implement."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not supported; "
                f"clara_jax implements {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in hf:
                raise ValueError(f"{source}: required field {key!r} is missing")
        n_layers = hf["num_hidden_layers"]
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads

        # transformers 5 writes rope_parameters; 4.x wrote rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        if not rope:
            rope = dict(hf.get("rope_scaling") or {})
            rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        rope_type = rope.get("rope_type", "default")
        if model_type == "phi3" and rope_type in ("su", "yarn"):
            rope_type = "longrope"  # Phi3Config renames these legacy spellings the same way
        max_positions = int(hf.get("max_position_embeddings", 4096))
        if rope_type == "default":
            scaling = ("default",)
        elif rope_type == "linear":
            scaling = ("linear", float(rope["factor"]))
        elif rope_type == "llama3":
            scaling = (
                "llama3",
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))),
            )
        elif rope_type == "longrope":
            if model_type == "phi3":
                # Phi3Config always has this top-level field (default 4096) and transformers lets it
                # override the one inside the rope dict.
                original = int(hf.get("original_max_position_embeddings", 4096))
            else:
                original = int(rope.get("original_max_position_embeddings", max_positions))
            factor = rope.get("factor")
            factor = max_positions / original if factor is None else float(factor)
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:  # the LongRoPE paper's default, as transformers computes it
                attention_factor = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
                )
            scaling = (
                "longrope",
                tuple(float(f) for f in rope["short_factor"]),
                tuple(float(f) for f in rope["long_factor"]),
                original,
                float(attention_factor),
            )
        else:
            raise ValueError(
                f"{source}: rope type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
        if partial != 1.0 and model_type != "phi3":
            # transformers' Llama/Mistral/Qwen attention rotates whole heads and fails otherwise.
            raise ValueError(
                f"{source}: partial_rotary_factor={partial} is only supported for phi3 "
                f"(transformers' {model_type} does not implement it either)"
            )

        window = hf.get("sliding_window")
        if model_type in ("mistral", "phi3"):
            windows = (int(window) if window else 0,) * n_layers
        elif model_type in ("qwen2", "qwen3"):
            layer_types = hf.get("layer_types")
            if layer_types is None:  # transformers 4.x spelling
                use = hf.get("use_sliding_window", False)
                max_window_layers = hf.get("max_window_layers", n_layers)
                layer_types = [
                    "sliding_attention" if use and i >= max_window_layers else "full_attention"
                    for i in range(n_layers)
                ]
            windows = tuple(int(window) if t == "sliding_attention" and window else 0 for t in layer_types)
        else:
            windows = (0,) * n_layers

        # Phi-3 hard-codes bias-free projections whatever the config says.
        attention_bias = bool(hf.get("attention_bias", False)) and model_type != "phi3"
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=(model_type == "qwen2") or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)) and model_type != "phi3",
            qk_norm=model_type == "qwen3",
            sliding_windows=windows,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> DecoderConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: no config.json; expected a transformers model directory")
        with open(cfg_path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_dict(hf, source=cfg_path)


def tiny_config(**overrides) -> DecoderConfig:
    """A 2-layer model small enough for unit tests and the laptop demo."""
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
    )
    base.update(overrides)
    return DecoderConfig(**base)
