"""Stage-3 candidates compressed once, before step 0.

Stage 3 freezes the compressor and the <MEM*> rows (stage_registry), and compresses without
dropout, so a candidate's memory vectors are constants of the stage. Re-compressing the B×N
candidates in every step, as the official code does, spends most of a step on a forward pass whose
result is known. Compressing each distinct candidate once and feeding the step `cand_memory`
[B, N, n_mem, D] gives the same loss and gradients up to float round-off (the cache pads documents
to other widths than a training batch would) at a fraction of the compute: a passage that recurs
across questions and epochs is compressed once.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from clara_jax.data.pipeline import encoder_rows
from clara_jax.data.tokenizer import ClaraTokenizer
from clara_jax.model.clara import COMPRESSOR, ClaraConfig, compress
from clara_jax.model.stage_registry import get_stage
from clara_jax.parallel.rules import logical_to_spec, parse_rules


class CandidateCache:
    """Memory vectors of every distinct candidate text; `lookup(texts)` serves the data pipeline."""

    def __init__(self, texts: Sequence[str], memory: np.ndarray, truncated: np.ndarray, seconds: float):
        self.row = {t: i for i, t in enumerate(texts)}
        self.memory, self.truncated, self.seconds = memory, truncated, seconds

    def __len__(self) -> int:
        return len(self.row)

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes

    def lookup(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """([len(texts), n_mem, D] memory, [len(texts)] was-truncated flags)."""
        rows = np.fromiter((self.row[t] for t in texts), dtype=np.int64, count=len(texts))
        return self.memory[rows], self.truncated[rows]

    @classmethod
    def for_config(cls, config, built, records: Sequence, mesh, *, progress: bool = False) -> CandidateCache:
        """The cache a run's config asks for: its sharding rules, candidate count and bucket."""
        with jax.set_mesh(mesh):
            return cls.build(
                built.model,
                built.tokenizer,
                built.clara,
                records,
                mesh,
                parse_rules(config.sharding_rules),
                candidates=config.data.candidates,
                bucket=config.data.bucket,
                progress=progress,
            )

    @classmethod
    def build(
        cls,
        model,
        tok: ClaraTokenizer,
        clara: ClaraConfig,
        records: Sequence,
        mesh,
        rules,
        *,
        candidates: int,
        bucket: int = 32,
        chunk: int = 64,
        progress: bool = False,
    ) -> CandidateCache:
        """Compress the first `candidates` docs of every record (those the pipeline reads).

        Every process holds every text and calls the same jitted program on the same chunks; the
        chunk's rows are split over the mesh by the "batch" rule and the result gathered back to
        every host, so the cache works from one CPU to a multi-host pod.
        """
        start = time.perf_counter()
        texts = list(dict.fromkeys(d for r in records for d in r.docs[:candidates]))
        rows = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0]))
        splits = math.prod(mesh.shape[a] for a in _axes(rows.spec[0]))
        chunk = -(-chunk // splits) * splits  # whole rows per device
        run = _compress_program(clara.n_mem)
        parts, truncated = [], []
        starts = range(0, len(texts), chunk)
        for s in tqdm(starts, desc="compress candidates", unit="batch", disable=not progress):
            part = texts[s : s + chunk]
            real = len(part)
            part += [part[-1]] * (chunk - real)  # one batch shape per bucketed width
            enc = encoder_rows(tok, part, clara.doc_max_length, bucket)
            ids, mask = (
                jax.make_array_from_callback(a.shape, rows, lambda i, a=a: a[i]) for a in (enc.ids, enc.mask)
            )
            memory = multihost_utils.process_allgather(run(model, ids, mask), tiled=True)
            parts.append(np.asarray(memory)[:real])
            truncated.append(np.asarray(enc.truncated)[:real])
        memory = np.concatenate(parts) if parts else np.zeros((0, clara.n_mem, 0), np.float32)
        flags = np.concatenate(truncated) if truncated else np.zeros(0, bool)
        return cls(texts, memory, flags, time.perf_counter() - start)


@functools.cache
def _compress_program(n_mem: int):
    """One jitted compressor per n_mem, so that a second cache of the same model (stage 3's
    evaluation candidates, training/stage_eval.py) reuses the programs the first one compiled."""
    return jax.jit(lambda model, ids, mask: compress(model, ids, mask, n_mem)[0])


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def reads_cached_candidates(config) -> bool:
    """Whether this stage's steps read `cand_memory` instead of re-compressing candidates: a retrieval
    stage whose compressor and <MEM*> rows are frozen, with `data.cache_candidates` on."""
    stage = get_stage(config.stage)
    frozen = stage.retrieval and COMPRESSOR not in stage.adapters and not stage.trains_mem_rows
    return bool(frozen and config.data.cache_candidates)
