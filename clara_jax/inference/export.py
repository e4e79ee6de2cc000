"""Compress a whole corpus once into sharded memory vectors that retrieval can search offline.

The directory's format (manifest.json, the shards, the progress markers, and how they are written
so a crash costs one shard) is `clara_jax.formats.embeddings`; the corpus rows are read by
`clara_jax.formats.corpus`. This module computes the vectors.

Why shards: a corpus of millions of documents takes hours to compress, so a crash must cost one
shard, not the run; the temp files a killed run left are removed when its shards are taken up
again. Shards are a fixed slice of the corpus order, which makes "every document exactly once"
hold by construction and lets P processes split the work (process p takes shards p, p+P, …)
without talking to each other.
Resuming into a directory made with another model, corpus or dtype is refused: mixing them would
give an index whose vectors are not comparable.
"""

from __future__ import annotations

import os

from clara_jax.formats import embeddings
from clara_jax.formats.corpus import read_corpus
from clara_jax.formats.embeddings import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    encode_shard,
    numpy_dtype,
    read_shard,
    shard_ids,
    shard_name,
)
from clara_jax.formats.model_dir import model_dir_path, model_fingerprint, read_clara_section, read_model_meta

# The format's names stay importable from here (`from clara_jax.inference.export import ...`).
__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "encode_shard",
    "export_corpus",
    "model_fingerprint",
    "numpy_dtype",
    "read_corpus",
    "read_shard",
    "shard_ids",
    "shard_name",
]


def _plan(model_dir: str, corpus_path: str, ids: list[str], corpus_sha: str, dtype: str, shard_size: int):
    resolved = model_dir_path(model_dir)
    c = read_clara_section(resolved, read_model_meta(resolved))
    return embeddings.plan_manifest(
        model_dir=model_dir,
        model_fingerprint=model_fingerprint(model_dir),
        corpus=corpus_path,
        corpus_sha256=corpus_sha,
        count=len(ids),
        dtype=dtype,
        shard_size=shard_size,
        doc_max_length=c["doc_max_length"],
        compression_rate=c["compression_rate"],
    )


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
    os.makedirs(os.path.join(out_dir, embeddings.PROGRESS_DIR), exist_ok=True)
    embeddings.check_resume(out_dir, plan)
    if not os.path.isfile(embeddings.manifest_path(out_dir)):
        embeddings.write_manifest(out_dir, plan)

    def bounds(i):
        return i * shard_size, min((i + 1) * shard_size, len(ids))

    todo = []
    for i in range(p, plan["num_shards"], n_proc):
        lo, hi = bounds(i)
        # only this process writes shard i, so temp files of it are a killed run's leftovers
        embeddings.remove_shard_temps(out_dir, i)
        if embeddings.shard_done(out_dir, i, hi - lo) is None:
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
            memory, _ = inference.compress_documents(texts[lo:hi])
            embeddings.write_shard(out_dir, i, encode_shard(memory, ids[lo:hi], lo, dtype), lo, hi - lo)
            bar.update(hi - lo)
        bar.close()
    return embeddings.finalize(out_dir, plan) or plan
