"""Zero-copy safetensors reading on the host, bfloat16 included, with no torch; files are untrusted.

The `safetensors` library reads every dtype, but `safe_open(..., "numpy")` copies each tensor out
of the file; a memory map of the documented layout (u64 header size, JSON header, raw
little-endian data) gives each tensor as a numpy view instead, which is what lets a 14 GB base or
a large index shard be read one tensor (or one row) at a time. Because that reader is our own,
it checks what the library would: the header size is capped and fits the file, every tensor's
offsets satisfy 0 <= begin <= end <= data size, and its byte count equals prod(shape) x itemsize,
so a hostile header gets a ValueError naming the file and tensor, never a MemoryError or a view
of the header bytes. Loading onto a mesh reads each device's slice of a tensor alone; there the
library's copy is the point (`read_slice`), once our reader has vetted the file's header.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

from clara_jax.safe_paths import plain_file_name

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
# The reference implementation's limit: no real header comes near it (a 7B model's is ~30 KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """Read-only view of one .safetensors file; the header is validated when the file is opened."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with open(self.path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header size)")
            (size,) = struct.unpack("<Q", raw)
            if size > min(MAX_HEADER_BYTES, file_size - 8):
                raise ValueError(
                    f"{self.path}: header size {size} bytes is larger than "
                    + (f"the file ({file_size} bytes)" if size > file_size - 8 else f"{MAX_HEADER_BYTES}")
                    + "; not a safetensors file, or a corrupt one"
                )
            try:  # JSONDecodeError and UnicodeDecodeError are ValueErrors; deep nesting is a RecursionError
                header = json.loads(f.read(size))
            except (ValueError, RecursionError) as e:
                raise ValueError(
                    f"{self.path}: corrupt safetensors header ({type(e).__name__}: {e})"
                ) from None
        if not isinstance(header, dict):
            raise ValueError(
                f"{self.path}: safetensors header is a JSON {type(header).__name__}, not an object"
            )
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{self.path}: '__metadata__' must be an object, got {type(metadata).__name__}")
        self.metadata = metadata
        self._offset = 8 + size
        self.data_size = file_size - self._offset
        for key, entry in header.items():
            self._check_entry(key, entry)
        self.entries = header
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _check_entry(self, key: str, entry) -> None:
        where = f"{self.path}: tensor {key!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: header entry must be an object, got {type(entry).__name__}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise ValueError(f"{where}: 'dtype' must be a string, got {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ValueError(f"{where}: 'data_offsets' must be [begin, end] integers, got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            raise ValueError(
                f"{where}: data_offsets {offsets} outside the data section; expected "
                f"0 <= begin <= end <= {self.data_size} (the bytes after the header)"
            )
        if dtype in _DTYPES:
            expected = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            if end - begin != expected:
                raise ValueError(
                    f"{where}: {end - begin} data bytes, but shape {shape} of {dtype} needs {expected}"
                )

    def keys(self):
        return self.entries.keys()

    def readable_shape(self, key: str) -> tuple[int, ...]:
        """The shape of a tensor `get` can read, from the header alone (ValueError for other dtypes)."""
        if key not in self.entries:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        entry = self.entries[key]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        return tuple(entry["shape"])

    def get(self, key: str) -> np.ndarray:
        shape = self.readable_shape(key)
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        if begin == end:  # empty tensor: nothing to map (and the file may hold no data at all)
            return np.zeros(shape, _DTYPES[entry["dtype"]])
        raw = self._map[self._offset + begin : self._offset + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(shape)

    def header_bytes(self) -> bytes:
        """The raw JSON header as stored (for fingerprints)."""
        return bytes(self._map[8 : self._offset])


def checkpoint_files(directory: str | os.PathLike) -> dict[str, str]:
    """{tensor name: file path} of an HF model directory (single file or sharded index).

    The index's `weight_map` values must be file names inside `directory`: a downloaded model
    directory cannot make us open files elsewhere.
    """
    directory = str(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{index}: not a JSON object with a 'weight_map' ({e})") from None
        if not weight_map or not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object mapping tensor names to file names")
        return {
            key: plain_file_name(directory, name, source=index, field=f"weight_map[{key!r}]")
            for key, name in weight_map.items()
        }
    if os.path.isfile(single):
        return {key: single for key in SafetensorsFile(single).keys()}
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    hint = (
        " (PyTorch .bin checkpoints are not read: re-save them with safe_serialization=True)"
        if any(n.endswith(".bin") for n in found)
        else ""
    )
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json{hint}; found {found[:10]}"
    )


def open_checkpoint(directory: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Map every tensor name of an HF model directory (single file or sharded index) to its file."""
    paths = checkpoint_files(directory)
    files = {path: SafetensorsFile(path) for path in sorted(set(paths.values()))}
    return {key: files[path] for key, path in paths.items()}


def read_slice(path: str, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """The `index` part of one tensor, copied out of the file; nothing else of it is read.

    The file is mapped for this one read only, so the pages it touched do not stay resident in
    this process while the rest of a large base is loaded.
    """
    with safe_open(path, framework="numpy") as f:
        return f.get_slice(key)[index]


# Bytes read from each end of every tensor for `weights_digest`.
DIGEST_SAMPLE_BYTES = 4096


def weights_digest(directory: str | os.PathLike) -> str:
    """sha256 identifying an HF model directory's weights without reading all of them.

    Covers every file's size and raw header (names, dtypes, shapes, offsets) plus the first and
    last 4 KiB of every tensor: headers alone cannot tell two fine-tunes of one architecture apart,
    and hashing whole files would read a 7B base (14 GB) at every load, export and server start;
    this reads ~8 KiB per tensor (a few MB). It detects a changed or swapped base, not a forgery.
    """
    h = hashlib.sha256()
    for path in sorted(set(checkpoint_files(directory).values())):
        file = SafetensorsFile(path)
        h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
        h.update(file.header_bytes())
        for key in sorted(file.keys()):
            begin, end = file.entries[key]["data_offsets"]
            lo, hi = file._offset + begin, file._offset + end
            if hi - lo <= 2 * DIGEST_SAMPLE_BYTES:
                h.update(bytes(file._map[lo:hi]))
            else:
                h.update(bytes(file._map[lo : lo + DIGEST_SAMPLE_BYTES]))
                h.update(bytes(file._map[hi - DIGEST_SAMPLE_BYTES : hi]))
    return h.hexdigest()
