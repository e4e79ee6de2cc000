"""Compress a whole corpus once into sharded memory vectors that retrieval can search offline.

    OUT/
      manifest.json                  settings, model + corpus fingerprints; "complete" once all shards are
      shard-00000.safetensors        "embeddings" [n, n_mem, D] (dtype as asked), ids in the metadata
      progress/shard-00000.json      written after its shard: the shard's count and sha256

Why this layout: a corpus of millions of documents takes hours to compress, so a crash must cost
one shard, not the run. Each shard is written to a temp file and `os.replace`d, and only then is
its progress marker written (also atomically, with the directory fsynced); a shard counts as done
iff its marker exists and the file's sha256 matches it, so a torn or corrupted shard is simply
redone, and the temp files a killed run left are removed when its shards are taken up again.
Shards are a fixed slice of the corpus order, which makes "every document exactly once" hold by
construction and lets P processes split the work (process p takes shards p, p+P, …) without
talking to each other.
Resuming into a directory made with another model, corpus or dtype is refused: mixing them would
give an index whose vectors are not comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clara_jax.file_io import remove_temps, sha256_file, write_bytes_atomic, write_json_atomic

FORMAT = "clara-jax-embeddings"
FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Settings that must agree between a directory's manifest and a run resuming into it.
_RESUME_KEYS = (
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
# The trained parts of a model directory, hashed whole; the base weights (which can be 14 GB, and
# are often referenced rather than copied) enter the fingerprint through their `weights_digest`.
_MODEL_FILES = ("clara.json", "adapters.safetensors", "embed_rows.safetensors")


def numpy_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _marker(out_dir: str, i: int) -> str:
    """The progress record written after shard i is complete."""
    return os.path.join(out_dir, "progress", f"shard-{i:05d}.json")


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the model directory's trained files and its base weights' digest: equal
    fingerprints = comparable vectors."""
    from clara_jax.interop.model_dir import base_weights, model_dir_path, read_model_meta

    model_dir = model_dir_path(model_dir)
    h = hashlib.sha256()
    for name in _MODEL_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not a clara-jax model directory (missing {name})")
        h.update(name.encode() + b"\0" + sha256_file(path).encode() + b"\0")
    _, base_digest = base_weights(model_dir, read_model_meta(model_dir))
    h.update(b"base\0" + base_digest.encode() + b"\0")
    return h.hexdigest()


# --- corpus ----------------------------------------------------------------------------------------


def _doc(obj, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object {{'id', 'text'[, 'title']}}, got {type(obj).__name__}")
    doc_id, text, title = obj.get("id"), obj.get("text"), obj.get("title")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise ValueError(f"{where}: field 'id' must be a non-empty string, got {doc_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: document {doc_id!r} has an empty or missing 'text' ({text!r})")
    if title is not None:
        if not isinstance(title, str):
            raise ValueError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
        if title.strip():
            text = f"{title}\n{text}"
    return doc_id, text


def _corpus_rows(path: str) -> Iterator[tuple[str, object]]:
    """(location label, raw object) per document; JSONL keeps exact line numbers."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for line_no, data in enumerate(f, start=1):
                if line_no == 1 and data.startswith(b"\xef\xbb\xbf"):
                    data = data[3:]
                if not data.strip():
                    continue
                try:
                    obj = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"{path}:{line_no}: not a JSON object ({exc})") from None
                yield f"{path}:{line_no}", obj
    elif suffix in (".json", ".parquet"):
        import datasets

        builder = "parquet" if suffix == ".parquet" else "json"
        dataset = datasets.load_dataset(builder, data_files=[path], split="train")
        for i, row in enumerate(dataset):
            yield f"{path}: row {i}", row
    else:
        raise ValueError(f"cannot read corpus {path}: expected .jsonl, .json or .parquet, got {suffix!r}")


def read_corpus(path: str | os.PathLike) -> tuple[list[str], list[str], str]:
    """(ids, texts, sha256 of the ordered (id, text) pairs); duplicates and blanks name their line."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    ids, texts, first_seen = [], [], {}
    h = hashlib.sha256()
    for where, obj in _corpus_rows(path):
        doc_id, text = _doc(obj, where)
        if doc_id in first_seen:
            raise ValueError(f"{where}: duplicate id {doc_id!r} (first at {first_seen[doc_id]})")
        first_seen[doc_id] = where
        ids.append(doc_id)
        texts.append(text)
        h.update(json.dumps([doc_id, text]).encode() + b"\n")
    if not ids:
        raise ValueError(f"{path}: the corpus has no documents")
    return ids, texts, h.hexdigest()


# --- shard files -----------------------------------------------------------------------------------


def encode_shard(embeddings: np.ndarray, ids: list[str], start: int, dtype: str) -> bytes:
    """A safetensors file in memory (hand-written: safetensors' numpy writer rejects bfloat16)."""
    data = np.ascontiguousarray(embeddings.astype(numpy_dtype(dtype))).tobytes()
    header = {
        "__metadata__": {"format": FORMAT, "ids": json.dumps(ids), "start": str(start)},
        "embeddings": {
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
    from clara_jax.interop.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    return f.get("embeddings"), json.loads(f.metadata["ids"])


def shard_ids(path: str | os.PathLike) -> list[str]:
    """Only the ids (reads the header, not the vectors)."""
    from clara_jax.interop.safetensors_io import SafetensorsFile

    return json.loads(SafetensorsFile(path).metadata["ids"])


# --- export ----------------------------------------------------------------------------------------


def _plan(model_dir: str, corpus_path: str, ids: list[str], corpus_sha: str, dtype: str, shard_size: int):
    from clara_jax.interop.model_dir import model_dir_path, read_model_meta

    c = read_model_meta(model_dir_path(model_dir))["clara"]
    n_shards = -(-len(ids) // shard_size)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "model_dir": os.path.abspath(model_dir),
        "model_fingerprint": model_fingerprint(model_dir),
        "corpus": os.path.abspath(corpus_path),
        "corpus_sha256": corpus_sha,
        "count": len(ids),
        "dtype": dtype,
        "shard_size": shard_size,
        "num_shards": n_shards,
        "doc_max_length": c["doc_max_length"],
        "compression_rate": c["compression_rate"],
        "n_mem": c["doc_max_length"] // c["compression_rate"],
    }


def _check_resume(out_dir: str, plan: dict) -> None:
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.isfile(path):
        # Another process of this run may already have made progress/ (before the plan lands).
        stray = [n for n in os.listdir(out_dir) if not n.startswith(".") and n != "progress"]
        if stray:
            raise ValueError(
                f"{out_dir}: not empty and has no manifest.json ({sorted(stray)[:3]}…); "
                "export into a new or empty directory"
            )
        return
    with open(path) as f:
        old = json.load(f)
    for key in _RESUME_KEYS:
        if old.get(key) != plan[key]:
            what = {"model_fingerprint": "a different model", "corpus_sha256": "a different corpus"}
            raise ValueError(
                f"{out_dir} was exported with {what.get(key, f'{key}={old.get(key)!r}')}, this run has "
                f"{key}={plan[key]!r}; resuming would mix incomparable vectors: export into a new "
                "directory (or delete this one)"
            )


def _shard_done(out_dir: str, i: int, expected_count: int) -> dict | None:
    """The shard's progress record if it is complete and intact, else None (redo it)."""
    marker = _marker(out_dir, i)
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


def _finalize(out_dir: str, plan: dict) -> dict | None:
    """The complete manifest once every shard has its marker (any process may write it: same bytes)."""
    shards = []
    for i in range(plan["num_shards"]):
        marker = _marker(out_dir, i)
        if not os.path.isfile(marker):
            return None
        with open(marker) as f:
            shards.append(json.load(f))
    first, _ = read_shard(os.path.join(out_dir, shard_name(0)))
    manifest = dict(
        plan, complete=True, hidden_size=int(first.shape[2]), embedding_shape=list(first.shape[1:])
    )
    manifest["shards"] = shards
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def export_corpus(
    model_dir: str | os.PathLike,
    corpus_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    shard_size: int = 4096,
    batch_size: int = 32,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict:
    """Compress every document of the corpus into OUT; resumes a partial export of the same settings.

    Returns the manifest: complete (with the shard list) when every shard is done, otherwise the
    plan with "complete": False (other processes still working on their shards).
    """
    import jax

    model_dir, corpus_path, out_dir = str(model_dir), str(corpus_path), str(out_dir)
    numpy_dtype(dtype)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    ids, texts, corpus_sha = read_corpus(corpus_path)
    plan = _plan(model_dir, corpus_path, ids, corpus_sha, dtype, shard_size)
    os.makedirs(os.path.join(out_dir, "progress"), exist_ok=True)
    _check_resume(out_dir, plan)
    if not os.path.isfile(os.path.join(out_dir, "manifest.json")):
        write_json_atomic(os.path.join(out_dir, "manifest.json"), plan)

    def bounds(i):
        return i * shard_size, min((i + 1) * shard_size, len(ids))

    todo = []
    for i in range(p, plan["num_shards"], n_proc):
        lo, hi = bounds(i)
        # only this process writes shard i, so temp files of it are a killed run's leftovers
        remove_temps(os.path.join(out_dir, shard_name(i)))
        remove_temps(_marker(out_dir, i))
        if _shard_done(out_dir, i, hi - lo) is None:
            todo.append(i)
    if todo:
        from tqdm import tqdm

        from clara_jax.inference.clara_model import ClaraInference
        from clara_jax.interop.model_dir import load_clara_model

        tok, model, clara = load_clara_model(model_dir)
        inference = ClaraInference(tok, model, clara, batch_size=batch_size)
        total = sum(bounds(i)[1] - bounds(i)[0] for i in todo)
        bar = tqdm(total=total, unit="doc", desc=f"export (process {p})", disable=not progress)
        for i in todo:
            lo, hi = bounds(i)
            memory = inference.compress_documents(texts[lo:hi])
            data = encode_shard(memory, ids[lo:hi], lo, dtype)
            write_bytes_atomic(os.path.join(out_dir, shard_name(i)), data)
            record = {
                "file": shard_name(i),
                "start": lo,
                "count": hi - lo,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            write_json_atomic(_marker(out_dir, i), record)
            bar.update(hi - lo)
        bar.close()
    return _finalize(out_dir, plan) or plan
