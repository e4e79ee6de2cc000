"""PEFT LoRA adapters <-> our named adapters, in both directions.

PEFT stores `lora_A.weight: [r, in]` and `lora_B.weight: [out, r]` per module; ours are the
transposes, stacked over layers. Layers the adapter does not target keep zero factors, which
is exactly "no adapter" there. Writing uses PEFT's own key spelling so that
`peft.PeftModel.from_pretrained(base, dir)` reads our adapters with no conversion step.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

from clara_jax.formats.safetensors_io import SafetensorsFile
from clara_jax.model.decoder import Decoder
from clara_jax.model.factory import add_adapters
from clara_jax.model.lora import ALL_LINEAR, PROJECTION_PATHS, LoRAConfig

# Accepts PeftModel keys (`base_model.model.model.layers…`), transformers-integration keys
# (`model.layers…`) and raw parameter names with the adapter name infix (`lora_A.NAME.weight`).
_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
    r"(?:\.[\w-]+)?\.weight"
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# HF families whose attention/MLP inputs are fused modules PEFT cannot target by our names.
_FUSED_MODEL_TYPES = {"phi3": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}


def lora_config_from_peft(cfg: dict, source: str = "adapter_config.json") -> LoRAConfig:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported")
    targets = cfg.get("target_modules") or "all-linear"
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(PROJECTION_PATHS))
        if unknown:
            raise ValueError(f"{source}: target_modules {unknown} are not decoder projections")
    return LoRAConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=targets,
    )


def parse_lora_key(key: str) -> tuple[int, str, str] | None:
    """(layer, projection, 'a'|'b') of a PEFT LoRA tensor name, or None if it is not one."""
    match = _KEY.fullmatch(key)
    if not match:
        return None
    return int(match.group(1)), match.group(2), match.group(3).lower()


def set_adapter_from_tensors(
    model: Decoder,
    name: str,
    lora: LoRAConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    source: str,
    *,
    require_complete: bool = False,
) -> None:
    """Add adapter `name` and fill it from PEFT-named (key, [r,in]/[out,r]) tensors.

    `require_complete` insists every targeted (layer, projection) got both factors: a missing
    tensor would otherwise silently leave a zero (no-op) adapter there.
    """
    add_adapters(model, {name: lora}, seeds=(0,))  # the factory's adapter, filled below
    adapter = model.adapters[name]
    factors = adapter.factors
    stacked = {
        t: {"a": np.zeros(f["a"].shape, np.float32), "b": np.zeros(f["b"].shape, np.float32)}
        for t, f in factors.items()
    }
    seen = set()
    for key, value in tensors:
        parsed = parse_lora_key(key)
        if parsed is None:
            raise ValueError(f"{source}: tensor {key!r} is not a LoRA factor of a decoder projection")
        layer, target, which = parsed
        if target not in stacked:
            raise ValueError(
                f"{source}: tensor {key!r} targets {target}, which the adapter config does not list"
            )
        if layer >= model.config.num_layers:
            raise ValueError(
                f"{source}: tensor {key!r} is for layer {layer}; the base has {model.config.num_layers}"
            )
        value = np.asarray(value, np.float32).T
        if value.shape != stacked[target][which][layer].shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {value.T.shape}, expected "
                f"{stacked[target][which][layer].T.shape} (rank {lora.rank})"
            )
        stacked[target][which][layer] = value
        seen.add((layer, target, which))
    if require_complete:
        missing = [
            f"layer {i} {t}.lora_{w.upper()}"
            for t, mask in adapter.layer_masks
            for i, on in enumerate(mask)
            if on
            for w in ("a", "b")
            if (i, t, w) not in seen
        ]
        if missing:
            raise ValueError(f"{source}: adapter {name!r} lacks {len(missing)} factors, e.g. {missing[:4]}")
    for target, f in factors.items():
        f["a"].set_value(jnp.asarray(stacked[target]["a"]))
        f["b"].set_value(jnp.asarray(stacked[target]["b"]))


def load_peft_adapter(model: Decoder, name: str, path: str | os.PathLike) -> None:
    """Add adapter `name` to `model` from a PEFT adapter directory."""
    path = str(path)
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing; expected a PEFT adapter directory")
    with open(cfg_path) as f:
        lora = lora_config_from_peft(json.load(f), cfg_path)
    file = SafetensorsFile(weights_path)
    set_adapter_from_tensors(model, name, lora, ((k, file.get(k)) for k in file.keys()), weights_path)


def peft_state_dict(model: Decoder, name: str) -> dict[str, np.ndarray]:
    """Adapter `name` as PEFT's saved state dict (PeftModel key spelling, targeted layers only)."""
    if name not in model.adapters:
        raise KeyError(f"no adapter named {name!r}; have {sorted(model.adapters)}")
    adapter = model.adapters[name]
    fused = _FUSED_MODEL_TYPES.get(model.config.model_type, ())
    out = {}
    for target, mask in adapter.layer_masks:
        if target in fused:
            raise ValueError(
                f"adapter {name!r} targets {target}, which transformers' {model.config.model_type} fuses "
                "(qkv_proj / gate_up_proj); PEFT cannot apply it there"
            )
        a = np.asarray(adapter.factors[target]["a"][...], np.float32)
        b = np.asarray(adapter.factors[target]["b"][...], np.float32)
        for i, on in enumerate(mask):
            if on:
                prefix = "base_model.model." + PROJECTION_PATHS[target].format(i=i)
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def peft_config_dict(lora: LoRAConfig, base_model_name_or_path: str = "") -> dict:
    """adapter_config.json for `lora`; "all-linear" is spelled out so no family heuristics apply."""
    targets = lora.target_modules
    if targets == "all-linear":
        targets = list(ALL_LINEAR)
    elif not isinstance(targets, str):
        targets = list(targets)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_peft_adapter(
    model: Decoder, name: str, out_dir: str | os.PathLike, *, base_model_name_or_path: str = ""
) -> str:
    """Write adapter `name` as a PEFT adapter directory (adapter_config.json + safetensors)."""
    from safetensors.numpy import save_file

    out_dir = str(out_dir)
    tensors = peft_state_dict(model, name)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config_dict(model.adapters[name].lora_config, base_model_name_or_path), f, indent=2)
    return out_dir


def export_peft(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, str]:
    """A clara-jax model directory -> OUT/base (transformers dir, CLaRa rows merged, tokenizer)
    plus one PEFT adapter directory per role (OUT/compressor, OUT/query_reasoner, OUT/generator).

    The base carries the trained <MEM*> rows and the extended vocabulary, so PEFT applied on it
    reproduces our model; returns {role or "base": path}.
    """
    from clara_jax.interop.hf import save_decoder
    from clara_jax.interop.model_dir import load_clara_model

    out_dir = os.path.abspath(str(out_dir))
    tok, model, _ = load_clara_model(str(model_dir))
    base = os.path.join(out_dir, "base")
    save_decoder(model, base)
    tok.hf.save_pretrained(base)
    written = {"base": base}
    for role in model.adapters:
        written[role] = save_peft_adapter(
            model, role, os.path.join(out_dir, role), base_model_name_or_path=base
        )
    return written
