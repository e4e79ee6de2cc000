"""Zero-copy safetensors reading on the host, bfloat16 included, with no torch.

`safetensors`' numpy backend rejects bfloat16, and its flax backend puts every tensor on the
default device; a memory map of the documented file layout (u64 header size, JSON header,
raw little-endian data) gives each tensor as a numpy view that we cast and place ourselves.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """Read-only view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header size)")
            (size,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._offset = 8 + size
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self):
        return self.entries.keys()

    def get(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._map[self._offset + begin : self._offset + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def open_checkpoint(directory: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Map every tensor name of an HF model directory (single file or sharded index) to its file."""
    directory = str(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no 'weight_map' field")
        files = {
            name: SafetensorsFile(os.path.join(directory, name)) for name in sorted(set(weight_map.values()))
        }
        return {key: files[name] for key, name in weight_map.items()}
    if os.path.isfile(single):
        file = SafetensorsFile(single)
        return {key: file for key in file.keys()}
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    hint = (
        " (PyTorch .bin checkpoints are not read: re-save them with safe_serialization=True)"
        if any(n.endswith(".bin") for n in found)
        else ""
    )
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json{hint}; found {found[:10]}"
    )


def iter_tensors(tensors: dict[str, SafetensorsFile]) -> Iterator[tuple[str, np.ndarray]]:
    for key, file in tensors.items():
        yield key, file.get(key)
