"""Top-k over an exported corpus (clara_jax.inference.export) by cosine or dot product, shard by shard.

    index = EmbeddingIndex.open("runs/wiki-index")
    ids, scores = index.search(query_vectors, k=5)            # query_vectors [Q, n_mem·D]
    ids, scores = search_questions(inference, ["Who …?"], k=5)  # encodes with the query reasoner

Why streaming: an exported corpus can be far larger than host or device memory, so search holds
one shard plus the running top-k [Q, k] and merges each shard's top-k into it with a jitted merge.
Shards are padded to the export's shard size (padding scores -inf) so every shard reuses one
compiled program. Scores are float32 cosines (vectors normalised in float32 whatever the stored
dtype), as stage 3 ranks them; `score="dot"` ranks by the raw inner product instead (a model trained
with `clara.retrieval_score = "dot"`, which `search_questions` passes on). The FAISS backend trades
memory for speed: it holds every vector.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.file_io import sha256_file
from clara_jax.formats.embeddings import read_manifest, read_shard
from clara_jax.model.topk import COSINE_EPS, SCORE_FUNCTIONS

BACKENDS = ("jax", "faiss")


@jax.jit
def _normalise(x: jax.Array) -> jax.Array:
    """x / max(||x||, eps) in float32, as cosine_scores (an all-zero vector scores 0, not NaN)."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), jnp.float32(COSINE_EPS) ** 2))


@jax.jit
def _float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _prepare(x, score: str) -> jax.Array:
    """Vectors as the score compares them: normalised for cosine, as they are for dot."""
    return _normalise(jnp.asarray(x)) if score == "cosine" else _float32(jnp.asarray(x))


@functools.partial(jax.jit, static_argnames="k")
def _shard_topk(queries, docs, n_valid, offset, k: int):
    """Top-k of one (padded) shard for prepared queries [Q, E] and docs [S, E]; global indices."""
    scores = jnp.einsum("qe,se->qs", queries, docs, precision=jax.lax.Precision.HIGHEST)
    scores = jnp.where(jnp.arange(docs.shape[0])[None, :] < n_valid, scores, -jnp.inf)
    top, idx = jax.lax.top_k(scores, k)
    return top, idx + offset


@functools.partial(jax.jit, static_argnames="k")
def _merge(scores_a, idx_a, scores_b, idx_b, k: int):
    """Running top-k merged with a shard's; ties go to a (the earlier shards), like lax.top_k."""
    scores = jnp.concatenate([scores_a, scores_b], axis=1)
    idx = jnp.concatenate([idx_a, idx_b], axis=1)
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(idx, pos, axis=1)


class EmbeddingIndex:
    """A read-only view of an export directory; shards are read (and checksummed) when searched."""

    def __init__(self, export_dir: str, manifest: dict):
        self.dir, self.manifest = export_dir, manifest
        self._verified: set[int] = set()
        self._faiss = None

    @classmethod
    def open(cls, export_dir: str | os.PathLike) -> EmbeddingIndex:
        """A complete export directory, its manifest checked (`clara_jax.formats.embeddings`)."""
        export_dir = str(export_dir)
        manifest = read_manifest(export_dir)
        return cls(export_dir, manifest)

    def __len__(self) -> int:
        return self.manifest["count"]

    @property
    def dim(self) -> int:
        return self.manifest["n_mem"] * self.manifest["hidden_size"]

    # ------------------------------------------------------------------ checks
    def check_model(self, clara, hidden_size: int, fingerprint: str | None = None) -> None:
        """Raise naming the field if a query model's vectors are not comparable with this index."""
        m = self.manifest
        theirs = {
            "compression_rate": clara.compression_rate,
            "n_mem": clara.n_mem,
            "hidden_size": hidden_size,
        }
        if fingerprint is not None:
            theirs["model_fingerprint"] = fingerprint
        for key, value in theirs.items():
            if m[key] != value:
                raise ValueError(
                    f"query model and index disagree on {key}: the index at {self.dir} has {m[key]!r}, "
                    f"the query model has {value!r} (was the index exported with another model?)"
                )

    def verify(self) -> None:
        """Checksum every shard now (search does it lazily, once per shard)."""
        for i in range(len(self.manifest["shards"])):
            self._load(i)

    def _load(self, i: int) -> tuple[np.ndarray, list[str] | None]:
        s = self.manifest["shards"][i]
        path = os.path.join(self.dir, s["file"])
        if i not in self._verified:
            if sha256_file(path) != s["sha256"]:
                raise ValueError(
                    f"{path}: checksum mismatch (corrupt shard); rerun `clara-jax export` into "
                    f"{self.dir} with the same arguments to redo it"
                )
            self._verified.add(i)
        emb, ids = read_shard(path)
        expected = (s["count"], *self.manifest["embedding_shape"])
        if tuple(emb.shape) != expected:
            raise ValueError(f"{path}: embeddings of shape {emb.shape}, the manifest says {expected}")
        return emb, ids

    def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2:
            raise ValueError(f"query vectors must be [Q, n_mem·hidden_size], got shape {queries.shape}")
        if queries.shape[1] != self.dim:
            m = self.manifest
            raise ValueError(
                f"query dim {queries.shape[1]} != index dim n_mem·hidden_size = {m['n_mem']}·{m['hidden_size']} "
                f"= {self.dim}: the query model's n_mem or hidden_size differs from the index"
            )
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be in [1, {len(self)}] (the number of indexed documents)")
        return queries

    def _ids(self, indices: np.ndarray) -> list[list[str]]:
        """Global row numbers -> document ids, reading only the needed shards' headers."""
        starts = np.array([s["start"] for s in self.manifest["shards"]])
        shard_of = np.searchsorted(starts, indices, side="right") - 1
        names = {}
        for i in np.unique(shard_of):
            names[int(i)] = read_shard(os.path.join(self.dir, self.manifest["shards"][i]["file"]))[1]
        return [
            [names[int(s)][int(g) - int(starts[s])] for s, g in zip(srow, grow)]
            for srow, grow in zip(shard_of, indices)
        ]

    def embeddings(self, ids: list[list[str]]) -> np.ndarray:
        """The stored memory vectors of `ids` ([Q][k] -> [Q, k, n_mem, D] float32), reading only the
        shards that hold them; what the generator reads after a search."""
        wanted = {doc for row in ids for doc in row}
        found: dict[str, np.ndarray] = {}
        for i in range(len(self.manifest["shards"])):
            shard_ids = read_shard(os.path.join(self.dir, self.manifest["shards"][i]["file"]))[1]
            if wanted.intersection(shard_ids):
                emb, shard_ids = self._load(i)
                for row, doc in enumerate(shard_ids):
                    if doc in wanted:
                        found[doc] = np.asarray(emb[row], np.float32)
        missing = sorted(wanted - set(found))
        if missing:
            raise KeyError(f"ids not in the index at {self.dir}: {missing[:5]}")
        return np.stack([np.stack([found[doc] for doc in row]) for row in ids])

    # ------------------------------------------------------------------ search
    def search(
        self,
        query_vectors,
        k: int = 5,
        *,
        backend: str = "jax",
        query_batch: int = 1024,
        score: str = "cosine",
    ) -> tuple[list[list[str]], np.ndarray]:
        """Top-k by `score` ("cosine" or "dot"): (ids [Q][k], scores float32 [Q, k]), best first."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if score not in SCORE_FUNCTIONS:
            raise ValueError(f"score must be one of {SCORE_FUNCTIONS}, got {score!r}")
        queries = self._check_queries(query_vectors, k)
        if queries.shape[0] == 0:
            return [], np.zeros((0, k), np.float32)
        if backend == "faiss":
            scores, indices = self._search_faiss(queries, k, score)
        else:
            scores, indices = self._search_jax(queries, k, query_batch, score)
        return self._ids(indices), scores

    def _search_jax(self, queries: np.ndarray, k: int, query_batch: int, score: str = "cosine"):
        q_total = queries.shape[0]
        qb = min(query_batch_size(q_total), query_batch)
        n_batches = -(-q_total // qb)
        padded = np.zeros((n_batches * qb, queries.shape[1]), np.float32)
        padded[:q_total] = queries
        q_norm = [_prepare(padded[b * qb : (b + 1) * qb], score) for b in range(n_batches)]
        size = self.manifest["shard_size"]
        shard_k = min(k, size)
        best = [
            (jnp.full((qb, k), -jnp.inf, jnp.float32), jnp.full((qb, k), -1, jnp.int32))
            for _ in range(n_batches)
        ]
        for i, s in enumerate(self.manifest["shards"]):
            emb, _ = self._load(i)
            docs = np.zeros((size, self.dim), np.float32)
            docs[: s["count"]] = np.asarray(emb, np.float32).reshape(s["count"], -1)
            docs = _prepare(docs, score)
            for b in range(n_batches):
                top, idx = _shard_topk(q_norm[b], docs, s["count"], s["start"], k=shard_k)
                best[b] = _merge(*best[b], top, idx.astype(jnp.int32), k=k)
            del docs, emb
        scores = np.concatenate([np.asarray(sc) for sc, _ in best])[:q_total]
        indices = np.concatenate([np.asarray(ix) for _, ix in best])[:q_total]
        return scores, indices

    def _search_faiss(self, queries: np.ndarray, k: int, score: str = "cosine"):
        if self._faiss is not None and self._faiss[0] != score:
            self._faiss = None  # built for the other score: its vectors are (not) normalised
        if self._faiss is None:
            try:
                import faiss
            except ImportError:
                raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu") from None
            index = faiss.IndexFlatIP(self.dim)
            for i, s in enumerate(self.manifest["shards"]):
                emb, _ = self._load(i)
                flat = np.asarray(emb, np.float32).reshape(s["count"], -1)
                index.add(np.ascontiguousarray(np.asarray(_prepare(flat, score))))
            self._faiss = (score, index)
        q = np.ascontiguousarray(np.asarray(_prepare(np.asarray(queries, np.float32), score)))
        scores, indices = self._faiss[1].search(q, k)
        return scores.astype(np.float32), indices.astype(np.int64)


def query_batch_size(n: int) -> int:
    """Next power of two (so a stream of varied query counts reuses a few compiled programs)."""
    return 1 << max(0, int(n - 1).bit_length())


def search_questions(
    inference,
    questions,
    k: int = 5,
    *,
    index: EmbeddingIndex | str,
    backend: str = "jax",
    model_fingerprint: str | None = None,
) -> tuple[list[list[str]], np.ndarray]:
    """Encode questions with the query reasoner and search the index (after a compatibility check),
    by the score the model was trained with (`clara.retrieval_score`)."""
    if not isinstance(index, EmbeddingIndex):
        index = EmbeddingIndex.open(index)
    index.check_model(inference.clara, inference.model.config.hidden_size, model_fingerprint)
    return index.search(
        inference.encode_queries(list(questions)),
        k,
        backend=backend,
        score=inference.clara.retrieval_score,
    )


def generate_from_index(
    inference,
    questions,
    index: EmbeddingIndex | str,
    *,
    k: int | None = None,
    max_new_tokens: int = 64,
    backend: str = "jax",
    sampling=None,
) -> tuple[list[str], list[list[str]], np.ndarray]:
    """Stage-3 inference over an exported corpus: the query reasoner of `inference` (a
    ClaraInference) searches the index, and the generator answers from the top-k stored vectors,
    in score order. Returns (answers, ids [B][k], scores [B, k])."""
    if not isinstance(index, EmbeddingIndex):
        index = EmbeddingIndex.open(index)
    k = k or inference.clara.top_k
    ids, scores = search_questions(inference, questions, k, index=index, backend=backend)
    memory = index.embeddings(ids)  # [B, k, n_mem, D]
    answers = inference.generate_from_compressed_documents_and_questions(
        list(questions), memory.reshape(-1, *memory.shape[2:]), max_new_tokens, sampling=sampling
    )
    return answers, ids, scores
