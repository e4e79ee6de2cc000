"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) -> named adapters.

PEFT stores `lora_A.weight: [r, in]` and `lora_B.weight: [out, r]` per module; ours are the
transposes, stacked over layers. Layers the adapter does not target keep zero factors, which
is exactly "no adapter" there.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clara_jax.interop.safetensors_io import SafetensorsFile
from clara_jax.model.decoder import Decoder
from clara_jax.model.lora import PROJECTION_PATHS, LoRAConfig

_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
    r"(?:\.[\w-]+)?\.weight"
)


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


def load_peft_adapter(model: Decoder, name: str, path: str | os.PathLike) -> None:
    """Add adapter `name` to `model` from a PEFT adapter directory."""
    path = str(path)
    cfg_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing; expected a PEFT adapter directory")
    with open(cfg_path) as f:
        lora = lora_config_from_peft(json.load(f), cfg_path)
    model.add_adapter(name, lora, rngs=nnx.Rngs(0))
    factors = model.adapters[name].factors
    stacked = {
        t: {"a": np.zeros(f["a"].shape, np.float32), "b": np.zeros(f["b"].shape, np.float32)}
        for t, f in factors.items()
    }
    file = SafetensorsFile(weights_path)
    for key in file.keys():
        match = _KEY.fullmatch(key)
        if not match:
            raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA factor of a decoder projection")
        layer, target, which = int(match.group(1)), match.group(2), match.group(3).lower()
        if target not in stacked:
            raise ValueError(
                f"{weights_path}: tensor {key!r} targets {target}, which adapter_config.json does not list"
            )
        stacked[target][which][layer] = np.asarray(file.get(key), np.float32).T
    for target, f in factors.items():
        f["a"].set_value(jnp.asarray(stacked[target]["a"]))
        f["b"].set_value(jnp.asarray(stacked[target]["b"]))
