"""transformers checkpoints <-> our Decoder, tensor by tensor, without torch.

Torch `Linear` weights are [out, in]; our kernels are [in, out]. RoPE uses HF's rotate-half
layout, so q/k need no permutation. Per-layer tensors are stacked into the scanned layout; onto a
mesh, each device's shard of a stack is read from the files by itself (`load_decoder(mesh=...)`).
Phi-3's fused `qkv_proj` / `gate_up_proj` are split into our separate projections at load (so
LoRA by projection name keeps working) and fused back at save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clara_jax.formats.safetensors_io import open_checkpoint, read_slice
from clara_jax.model.config import DecoderConfig
from clara_jax.model.decoder import Decoder
from clara_jax.parallel.rules import DEFAULT_RULES, state_shardings

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF per-layer suffix -> (our stacked name, transpose)
_LAYER_KEYS = {
    "input_layernorm.weight": ("attn_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
}
for _p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    _LAYER_KEYS[f"self_attn.{_p}.weight"] = (_p, True)
    _LAYER_KEYS[f"self_attn.{_p}.bias"] = (_p + "_bias", False)
for _p in ("gate_proj", "up_proj", "down_proj"):
    _LAYER_KEYS[f"mlp.{_p}.weight"] = (_p, True)
    _LAYER_KEYS[f"mlp.{_p}.bias"] = (_p + "_bias", False)
_GLOBAL_KEYS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Phi-3 fused weight suffix -> the unfused suffixes it concatenates along the output (row) axis.
_FUSED = {
    "self_attn.qkv_proj.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_FUSED_MODEL_TYPES = ("phi3",)


def _fused_sizes(cfg: DecoderConfig, fused: str) -> tuple[int, ...]:
    """Row counts of each part of a fused tensor, in HF's order (q,k,v / gate,up)."""
    if fused == "self_attn.qkv_proj.weight":
        return (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)
    return (cfg.intermediate_size, cfg.intermediate_size)


def _hf_suffixes(cfg: DecoderConfig, layer_names) -> list[str]:
    """Per-layer checkpoint suffixes for our stacked params, fused where the family fuses them."""
    inverse = {ours: suffix for suffix, (ours, _) in _LAYER_KEYS.items()}
    suffixes = [inverse[name] for name in layer_names]
    if cfg.model_type in _FUSED_MODEL_TYPES:
        for fused, parts in _FUSED.items():
            suffixes = [s for s in suffixes if s not in parts] + [fused]
    return suffixes


def _expected_keys(cfg: DecoderConfig, layer_names) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        keys.append("lm_head.weight")
    suffixes = _hf_suffixes(cfg, layer_names)
    keys += [f"model.layers.{i}.{suffix}" for i in range(cfg.num_layers) for suffix in suffixes]
    return keys


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one of our arrays (one layer's, or a global one) lives: a checkpoint tensor, transposed
    for Linear weights, or the rows of a fused tensor from `row_offset` on."""

    file: str
    key: str
    transpose: bool = False
    row_offset: int = 0

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        """The part at `index` (start/stop slices in our layout), as stored; nothing else is read."""
        on_disk = index[::-1] if self.transpose else index
        if self.row_offset:
            rows = on_disk[0]
            on_disk = (slice(rows.start + self.row_offset, rows.stop + self.row_offset),) + on_disk[1:]
        value = read_slice(self.file, self.key, on_disk)
        return value.T if self.transpose else value


def _plan_sources(path: str, cfg: DecoderConfig, model: Decoder, strict: bool) -> dict[tuple, object]:
    """Our parameter path -> its `_Source` (a list of one per layer for stacked parameters).

    Names and shapes are checked from the file headers alone, before any weight is read.
    """
    tensors = open_checkpoint(path)
    layer_names = list(model.layers.keys())
    missing = [k for k in _expected_keys(cfg, layer_names) if k not in tensors]
    if missing:
        shown = ", ".join(missing[:12]) + (f" … ({len(missing)} in all)" if len(missing) > 12 else "")
        raise ValueError(
            f"{path}: checkpoint lacks tensors required by its config ({cfg.model_type}): {shown}"
        )

    stacked = {name: [None] * cfg.num_layers for name in layer_names}
    sources = {}
    unexpected = []
    fused = cfg.model_type in _FUSED_MODEL_TYPES
    for key, file in tensors.items():
        match = _LAYER.fullmatch(key)
        if fused and match and match.group(2) in _FUSED:
            layer = int(match.group(1))
            if layer >= cfg.num_layers:
                unexpected.append(key)
                continue
            shape = file.readable_shape(key)
            sizes = _fused_sizes(cfg, match.group(2))
            if shape != (sum(sizes), cfg.hidden_size):
                raise ValueError(
                    f"{path}: tensor {key} has shape {shape}, config implies {(sum(sizes), cfg.hidden_size)}"
                )
            offsets = np.cumsum((0,) + sizes[:-1])
            for part_suffix, offset in zip(_FUSED[match.group(2)], offsets, strict=True):
                name, _ = _LAYER_KEYS[part_suffix]
                stacked[name][layer] = _Source(file.path, key, transpose=True, row_offset=int(offset))
        elif match and match.group(2) in _LAYER_KEYS and _LAYER_KEYS[match.group(2)][0] in stacked:
            name, transpose = _LAYER_KEYS[match.group(2)]
            layer = int(match.group(1))
            if layer >= cfg.num_layers or (fused and any(match.group(2) in p for p in _FUSED.values())):
                unexpected.append(key)  # a phi3 checkpoint carries these only in fused form
                continue
            shape = file.readable_shape(key)
            target = model.layers[name].shape[1:]
            if (shape[::-1] if transpose else shape) != target:
                raise ValueError(
                    f"{path}: tensor {key} has shape {shape}, config implies "
                    f"{target[::-1] if transpose else target}"
                )
            stacked[name][layer] = _Source(file.path, key, transpose)
        elif key in _GLOBAL_KEYS and not (key == "lm_head.weight" and cfg.tie_word_embeddings):
            name = _GLOBAL_KEYS[key]
            shape, expected = file.readable_shape(key), getattr(model, name).shape
            if shape != expected:
                raise ValueError(f"{path}: tensor for {name} has shape {shape}, expected {expected}")
            sources[(name,)] = _Source(file.path, key)
        elif key == "lm_head.weight" or _IGNORED.fullmatch(key):
            continue  # tied models may still ship a copy of the embedding as lm_head
        else:
            unexpected.append(key)
    if unexpected and strict:
        raise ValueError(
            f"{path}: tensors this decoder does not use: {', '.join(unexpected[:12])}"
            f"{' …' if len(unexpected) > 12 else ''} (pass strict=False to ignore them)"
        )
    sources.update({("layers", name): layers for name, layers in stacked.items()})
    return sources


def _reader(source, dtype):
    """index (start/stop slices) -> that part of the parameter as `dtype`, converted slice by slice;
    a stacked parameter reads only the layers the index covers."""
    if isinstance(source, _Source):
        return lambda index: np.ascontiguousarray(source.read(index), dtype)

    def read_layers(index):
        layers, rest = index[0], index[1:]
        picked = source[layers]
        out = np.empty((len(picked),) + tuple(s.stop - s.start for s in rest), dtype)
        for i, layer in enumerate(picked):
            out[i] = layer.read(rest)  # the assignment converts to `dtype`
        return out

    return read_layers


def _place(shape, read, sharding) -> jax.Array:
    """One parameter on the default device (sharding None) or straight into its shards: each
    device's callback reads just its slice, once per distinct slice (replicas share it)."""
    whole = tuple(slice(0, n) for n in shape)
    if sharding is None:
        return jnp.asarray(read(whole))
    slices = {}

    def read_shard(index):
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        bounds = tuple((s.start, s.stop) for s in index)
        if bounds not in slices:
            slices[bounds] = read(index)
        return slices[bounds]

    return jax.make_array_from_callback(shape, sharding, read_shard)


def load_decoder(
    path: str | os.PathLike,
    dtype="float32",
    *,
    remat: str = "none",
    strict: bool = True,
    mesh=None,
    rules=DEFAULT_RULES,
) -> Decoder:
    """Read a local transformers directory (config.json + safetensors) into a Decoder.

    `dtype` is a DTypePolicy spec ('float32', 'bfloat16', 'p=bfloat16,c=float32').
    Without a `mesh`, each parameter is read whole onto the default device. With one, each is
    laid out by `rules` and every device's shard is read from the files by itself, so a base
    too large for one device (or for host memory) never exists whole anywhere.
    """
    path = str(path)
    cfg = DecoderConfig.from_hf_dir(path)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    sources = _plan_sources(path, cfg, model, strict)
    variables = dict(nnx.to_flat_state(nnx.state(model)))
    shardings = {} if mesh is None else dict(nnx.to_flat_state(state_shardings(model, mesh, rules)))

    def sharding_of(where: tuple):
        return shardings[where].get_value() if shardings else None

    for where, source in sources.items():
        var = variables[where]
        var.set_value(_place(var.shape, _reader(source, model.policy.param), sharding_of(where)))
    rows = model.embed_rows
    rows.set_value(jnp.zeros(rows.shape, rows.dtype, device=sharding_of(("embed_rows",))))
    return model


def hf_config_dict(cfg: DecoderConfig) -> dict:
    """A transformers config.json describing `cfg` (v5 spelling, readable by 4.x too)."""
    rope = {"rope_type": cfg.rope_scaling[0], "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling[0] == "linear":
        rope["factor"] = cfg.rope_scaling[1]
    elif cfg.rope_scaling[0] == "llama3":
        _, factor, low, high, old = cfg.rope_scaling
        rope.update(
            factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=old
        )
    elif cfg.rope_scaling[0] == "longrope":
        _, short, long, old, attention_factor = cfg.rope_scaling
        rope.update(
            short_factor=list(short),
            long_factor=list(long),
            original_max_position_embeddings=old,
            attention_factor=attention_factor,
        )
    if cfg.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "phi3": "Phi3ForCausalLM",
    }[cfg.model_type]
    out = dict(
        architectures=[arch],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if cfg.model_type in ("llama", "qwen3"):
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type in ("mistral", "phi3"):
        out["sliding_window"] = cfg.sliding_windows[0] or None
    if cfg.model_type == "phi3":
        # Phi3Config defaults this to 4096 and lets it override the rope dict, so always write it.
        out["original_max_position_embeddings"] = (
            cfg.rope_scaling[3] if cfg.rope_scaling[0] == "longrope" else cfg.max_position_embeddings
        )
        if cfg.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.model_type in ("qwen2", "qwen3"):
        windows = [w for w in cfg.sliding_windows if w]
        out.update(
            sliding_window=windows[0] if windows else None,
            use_sliding_window=bool(windows),
            layer_types=["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows],
        )
    return out


def save_decoder(model: Decoder, path: str | os.PathLike) -> None:
    """Write the base weights (trained embedding rows merged back) as a transformers directory."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    cfg = model.config
    inverse = {ours: (suffix, transpose) for suffix, (ours, transpose) in _LAYER_KEYS.items()}
    out = {
        "model.embed_tokens.weight": np.asarray(model.merged_embedding(), np.float32),
        "model.norm.weight": np.asarray(model.final_norm[...], np.float32),
    }
    if model.lm_head is not None:
        out["lm_head.weight"] = np.asarray(model.lm_head[...], np.float32)
    for name, var in model.layers.items():
        suffix, transpose = inverse[name]
        stacked = np.asarray(var[...], np.float32)
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(
                stacked[i].T if transpose else stacked[i]
            )
    if cfg.model_type in _FUSED_MODEL_TYPES:  # transformers' Phi3 only has the fused modules
        for i in range(cfg.num_layers):
            for fused, parts in _FUSED.items():
                out[f"model.layers.{i}.{fused}"] = np.concatenate(
                    [out.pop(f"model.layers.{i}.{part}") for part in parts], axis=0
                )
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg), f, indent=2)
