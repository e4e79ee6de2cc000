"""Multi-hop questions (MuSiQue, HotpotQA) laid out for stage 2, stage 3 and evaluation.

`sources.musique_to_retrieval` / `hotpotqa_to_retrieval` read the files into `RetrievalRecord`s with
their gold passages labelled; this module splits them and writes each stage's records. Splits are by
position within each file, never shuffled, so a held-out part stays held out whenever the files are
re-read. Candidate pools are cut or filled to one size, so every question is scored among as many
passages (Recall@k is only comparable that way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clara_jax.data.records import RetrievalRecord


def split_by_position(
    records: Sequence[RetrievalRecord], bounds: dict[str, tuple[int, int]]
) -> dict[str, list[RetrievalRecord]]:
    """{split: the records at positions [start, stop)} of one file's records."""
    return {name: list(records[start:stop]) for name, (start, stop) in bounds.items()}


def candidates(r: RetrievalRecord, n: int, pool: Sequence[str], seed: int) -> tuple[list[str], list[int]]:
    """`n` candidates for `r`: every gold passage, its own distractors in file order, then passages
    of `pool` (other questions') if it has too few; shuffled by a seed of (seed, question)."""
    if len(r.pos_index) > n:
        raise ValueError(f"{r.question!r}: {len(r.pos_index)} gold passages do not fit in {n} candidates")
    rng = np.random.default_rng([seed, *r.question.encode()])
    chosen = [r.docs[i] for i in r.pos_index]
    chosen += [d for i, d in enumerate(r.docs) if i not in r.pos_index][: n - len(chosen)]
    if len(chosen) < n:
        own = set(r.docs)
        extra = [p for p in pool if p not in own]
        picks = rng.choice(len(extra), n - len(chosen), replace=False)
        chosen += [extra[int(i)] for i in picks]
    order = rng.permutation(n)
    docs = [chosen[int(i)] for i in order]
    gold = sorted(int(np.flatnonzero(order == g)[0]) for g in range(len(r.pos_index)))
    return docs, gold


def retrieval_record(r: RetrievalRecord, n: int, pool: Sequence[str], seed: int = 0) -> dict:
    """A stage-3 / evaluation record: the question among `n` candidates, gold positions labelled."""
    docs, gold = candidates(r, n, pool, seed)
    return {
        "question": r.question,
        "docs": docs,
        "pos_index": gold,
        "answer": r.answer,
        "golden_answers": list(r.answers),
    }


def instruction_record(r: RetrievalRecord, k: int, pool: Sequence[str], seed: int = 0) -> dict:
    """A stage-2 record: the gold passages and the first distractors, `k` in a shuffled order."""
    docs, _ = candidates(r, k, pool, seed)
    return {"question": r.question, "docs": docs, "answer": r.answer}


def passage_pool(records: Sequence[RetrievalRecord]) -> list[str]:
    """Every distinct passage of `records`, in order: the filler for questions with too few."""
    return list(dict.fromkeys(d for r in records for d in r.docs if d))
