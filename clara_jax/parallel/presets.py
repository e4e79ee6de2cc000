"""Named sharding presets: mesh, rematerialisation and dtype chosen together."""

from __future__ import annotations

import ml_collections

# `clara-jax compile --parallelism NAME`, or `apply_parallelism` in a config file (configs/common.py
# applies "fsdp" to 7B-class presets). FSDP splits the frozen base, the adapters and the optimizer state over every chip and the batch with them; tensor parallelism
# additionally splits heads, MLP and vocabulary (the Megatron layout) when the per-chip batch
# is too small to feed FSDP alone. A 7B base in bf16 is 14.5 GB: it cannot be replicated on a
# 16 GiB chip next to its activations, hence FSDP and full rematerialisation (each layer's
# activations, e.g. 2048² float32 attention scores per head, are recomputed in the backward pass).
PARALLELISM = {
    "dp": {"mesh": "data=-1,fsdp=1,tensor=1", "model.remat": "none"},
    "fsdp": {
        "mesh": "data=1,fsdp=-1,tensor=1",
        "model.remat": "full",
        "model.dtype": "p=bfloat16,c=bfloat16",
    },
    "fsdp_tp2": {
        "mesh": "data=1,fsdp=-1,tensor=2",
        "model.remat": "full",
        "model.dtype": "p=bfloat16,c=bfloat16",
    },
    "fsdp_tp4": {
        "mesh": "data=1,fsdp=-1,tensor=4",
        "model.remat": "full",
        "model.dtype": "p=bfloat16,c=bfloat16",
    },
}


def set_path(c: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Set the field `dotted` ("model.remat") of the nested ConfigDict `c`; every part must exist
    (a KeyError names the missing one). The one dotted-path setter of the package: the presets
    below and `--config.a.b=value` overrides (training/config.py) use it."""
    *parents, leaf = dotted.split(".")
    node = c
    for part in parents:
        node = node[part]
    node[leaf] = value


def apply_parallelism(c: ml_collections.ConfigDict, name: str) -> None:
    """Set the mesh / remat / dtype fields of a named sharding preset (see PARALLELISM)."""
    if name not in PARALLELISM:
        raise ValueError(f"unknown parallelism preset {name!r}; known: {sorted(PARALLELISM)}")
    for dotted, value in PARALLELISM[name].items():
        set_path(c, dotted, value)
