"""The on-disk format of an exported corpus: sharded memory vectors and their manifest.

    OUT/
      manifest.json                  settings, model + corpus fingerprints; "complete" once all shards are
      shard-00000.safetensors        "embeddings" [n, n_mem, D] (dtype as asked), ids in the metadata
      progress/shard-00000.json      written after its shard: the shard's {file, start, count, sha256}

manifest.json (format "clara-jax-embeddings", format_version 1): format, format_version, complete,
model_dir, model_fingerprint, corpus, corpus_sha256, count, dtype, shard_size, num_shards,
doc_max_length, compression_rate, n_mem; once complete also hidden_size, embedding_shape
([n_mem, D]) and shards (the progress records, in order).

Crash safety is part of the format: a shard is written to a temp file and `os.replace`d, and only
then is its progress marker written (also atomically, with the directory fsynced); a shard counts
as done iff its marker exists and the file's sha256 matches it, so a torn or corrupted shard is
simply redone. Shard i always holds rows [i·shard_size, i·shard_size + count).

`clara_jax.inference.export` computes the vectors and writes them through this module;
`clara_jax.inference.index` opens a complete export with `read_manifest`, which refuses a manifest
(a downloaded index is untrusted) whose shard list an export could not have written.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from clara_jax.file_io import remove_temps, sha256_file, write_bytes_atomic, write_json_atomic
from clara_jax.formats.safetensors_io import SafetensorsFile

FORMAT = "clara-jax-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS_DIR = "progress"
TENSOR = "embeddings"
DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Settings that must agree between a directory's manifest and a run resuming into it.
RESUME_KEYS = (
    "format_version",
    "model_fingerprint",
    "corpus_sha256",
    "count",
    "dtype",
    "shard_size",
    "doc_max_length",
    "compression_rate",
    "n_mem",
)


def numpy_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def marker_path(out_dir: str, i: int) -> str:
    """The progress record written after shard i is complete."""
    return os.path.join(out_dir, PROGRESS_DIR, f"shard-{i:05d}.json")


def manifest_path(out_dir: str) -> str:
    return os.path.join(out_dir, MANIFEST)


# --- shard files -----------------------------------------------------------------------------------


def encode_shard(embeddings: np.ndarray, ids: list[str], start: int, dtype: str) -> bytes:
    """A safetensors file in memory (hand-written: safetensors' numpy writer rejects bfloat16)."""
    data = np.ascontiguousarray(embeddings.astype(numpy_dtype(dtype))).tobytes()
    header = {
        "__metadata__": {"format": FORMAT, "ids": json.dumps(ids), "start": str(start)},
        TENSOR: {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(embeddings.shape),
            "data_offsets": [0, len(data)],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + data


def read_shard(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(embeddings as stored, memory-mapped; ids) of one shard."""
    f = SafetensorsFile(path)
    return f.get(TENSOR), json.loads(f.metadata["ids"])


def shard_ids(path: str | os.PathLike) -> list[str]:
    """Only the ids (reads the header, not the vectors)."""
    return json.loads(SafetensorsFile(path).metadata["ids"])


def write_shard(out_dir: str, i: int, data: bytes, start: int, count: int) -> dict:
    """Shard i's file (`encode_shard` bytes), then its progress record; returns the record."""
    write_bytes_atomic(os.path.join(out_dir, shard_name(i)), data)
    record = {
        "file": shard_name(i),
        "start": start,
        "count": count,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_json_atomic(marker_path(out_dir, i), record)
    return record


def remove_shard_temps(out_dir: str, i: int) -> None:
    """The temp files a killed writer of shard i left (call only from the process that owns shard i)."""
    remove_temps(os.path.join(out_dir, shard_name(i)))
    remove_temps(marker_path(out_dir, i))


def shard_done(out_dir: str, i: int, expected_count: int) -> dict | None:
    """The shard's progress record if it is complete and intact, else None (redo it)."""
    marker = marker_path(out_dir, i)
    path = os.path.join(out_dir, shard_name(i))
    if not (os.path.isfile(marker) and os.path.isfile(path)):
        return None
    try:
        with open(marker) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if (
        not isinstance(rec, dict)
        or rec.get("file") != shard_name(i)
        or rec.get("count") != expected_count
        or sha256_file(path) != rec.get("sha256")
    ):
        return None
    return rec


# --- the manifest ----------------------------------------------------------------------------------


def plan_manifest(
    *,
    model_dir: str,
    model_fingerprint: str,
    corpus: str,
    corpus_sha256: str,
    count: int,
    dtype: str,
    shard_size: int,
    doc_max_length: int,
    compression_rate: int,
) -> dict:
    """The manifest of an export that has not finished ("complete": False)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "model_dir": os.path.abspath(model_dir),
        "model_fingerprint": model_fingerprint,
        "corpus": os.path.abspath(corpus),
        "corpus_sha256": corpus_sha256,
        "count": count,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_shards": -(-count // shard_size),
        "doc_max_length": doc_max_length,
        "compression_rate": compression_rate,
        "n_mem": doc_max_length // compression_rate,
    }


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def check_resume(out_dir: str, plan: dict) -> None:
    """Refuse to export into `out_dir` if what is there was made with other settings (or is not
    an export); an empty directory, or one holding only progress/, is fine."""
    path = manifest_path(out_dir)
    if not os.path.isfile(path):
        # Another process of this run may already have made progress/ (before the plan lands).
        stray = [n for n in os.listdir(out_dir) if not n.startswith(".") and n != PROGRESS_DIR]
        if stray:
            raise ValueError(
                f"{out_dir}: not empty and has no manifest.json ({sorted(stray)[:3]}…); "
                "export into a new or empty directory"
            )
        return
    old = _load_json(path)
    if not isinstance(old, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(old).__name__}")
    for key in RESUME_KEYS:
        if old.get(key) != plan[key]:
            what = {"model_fingerprint": "a different model", "corpus_sha256": "a different corpus"}
            raise ValueError(
                f"{out_dir} was exported with {what.get(key, f'{key}={old.get(key)!r}')}, this run has "
                f"{key}={plan[key]!r}; resuming would mix incomparable vectors: export into a new "
                "directory (or delete this one)"
            )


def write_manifest(out_dir: str, manifest: dict) -> None:
    write_json_atomic(manifest_path(out_dir), manifest)


def finalize(out_dir: str, plan: dict) -> dict | None:
    """The complete manifest once every shard has its marker (any process may write it: same bytes)."""
    shards = []
    for i in range(plan["num_shards"]):
        marker = marker_path(out_dir, i)
        if not os.path.isfile(marker):
            return None
        with open(marker) as f:
            shards.append(json.load(f))
    first, _ = read_shard(os.path.join(out_dir, shard_name(0)))
    manifest = dict(
        plan, complete=True, hidden_size=int(first.shape[2]), embedding_shape=list(first.shape[1:])
    )
    manifest["shards"] = shards
    write_manifest(out_dir, manifest)
    return manifest


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_shard_list(path: str, manifest: dict) -> None:
    """Refuse a manifest whose shard list an export could not have written.

    A downloaded index is untrusted: shard i must be the file `shard_name(i)` of the export
    directory (never an absolute path or `..`, which would read any local file) and cover rows
    [i·shard_size, i·shard_size + count).
    """
    size, n, shards = manifest.get("shard_size"), manifest.get("num_shards"), manifest.get("shards")
    if not (_is_int(size) and size >= 1 and _is_int(n) and n >= 1):
        raise ValueError(
            f"{path}: fields shard_size and num_shards must be positive integers, got {size!r}, {n!r}"
        )
    if not isinstance(shards, list) or len(shards) != n:
        got = f"{len(shards)} entries" if isinstance(shards, list) else repr(type(shards).__name__)
        raise ValueError(f"{path}: field shards must list num_shards={n} shards, got {got}")
    for i, s in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(s, dict):
            raise ValueError(f"{where} must be an object, got {type(s).__name__}")
        if s.get("file") != shard_name(i):
            raise ValueError(
                f"{where}.file is {s.get('file')!r}, expected {shard_name(i)!r} (shard files are named by "
                "their position in the export directory; other names and paths are refused)"
            )
        if s.get("start") != i * size:
            raise ValueError(f"{where}.start is {s.get('start')!r}, expected {i * size} (= {i} · shard_size)")
        count = s.get("count")
        if not (_is_int(count) and 1 <= count <= size):
            raise ValueError(f"{where}.count must be an integer in [1, shard_size={size}], got {count!r}")
        if not isinstance(s.get("sha256"), str):
            raise ValueError(f"{where}.sha256 must be a hex string, got {s.get('sha256')!r}")


def read_manifest(export_dir: str) -> dict:
    """The manifest of a complete export, checked: format and version, completeness, the shard
    list (`check_shard_list`), the counts, and that every listed shard file is there."""
    path = manifest_path(export_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not an export directory (no manifest.json)")
    manifest = _load_json(path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}"
        )
    if not manifest.get("complete"):
        progress = os.path.join(export_dir, PROGRESS_DIR)
        done = len(os.listdir(progress)) if os.path.isdir(progress) else 0
        raise ValueError(
            f"{export_dir}: export incomplete ({done} of {manifest.get('num_shards')} shards done); "
            "rerun `clara-jax export` with the same arguments to finish it"
        )
    check_shard_list(path, manifest)
    counts = sum(s["count"] for s in manifest["shards"])
    if counts != manifest["count"]:
        raise ValueError(f"{path}: shard counts sum to {counts}, the manifest says {manifest['count']}")
    for s in manifest["shards"]:
        if not os.path.isfile(os.path.join(export_dir, s["file"])):
            raise FileNotFoundError(f"{export_dir}: shard {s['file']} listed in the manifest is missing")
    return manifest
