"""Multi-hop questions laid out for stages 2-3: fixed splits, gold always among the candidates."""

from __future__ import annotations

from pathlib import Path

import pytest

from clara_jax.data.multihop import (
    candidates,
    instruction_record,
    passage_pool,
    retrieval_record,
    split_by_position,
)
from clara_jax.data.records import RetrievalRecord, parse_record
from clara_jax.data.sources import hotpotqa_to_retrieval, musique_to_retrieval

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "multihop_train"


def record(i: int, n_docs: int, gold: tuple[int, ...]) -> RetrievalRecord:
    return RetrievalRecord(
        question=f"question {i}?",
        answer=f"a{i}",
        answers=(f"a{i}", f"alias {i}"),
        docs=tuple(f"T{i}.{j}\ntext {i}.{j}" for j in range(n_docs)),
        pos_index=gold,
    )


def test_candidates_keep_every_gold_and_fill_short_pools():
    pool = passage_pool([record(9, 30, (0,))])
    r = record(1, 4, (1, 3))
    docs, gold = candidates(r, 10, pool, seed=0)
    assert len(docs) == len(set(docs)) == 10
    assert sorted(docs[g] for g in gold) == [r.docs[1], r.docs[3]]
    assert {r.docs[0], r.docs[2]} <= set(docs)  # its own distractors before any filler
    assert sum(d.startswith("T9.") for d in docs) == 6
    assert candidates(r, 10, pool, seed=0) == (docs, gold)  # deterministic
    assert candidates(r, 10, pool, seed=1)[0] != docs  # another order for another seed


def test_candidates_cut_long_pools_to_gold_then_first_distractors():
    r = record(2, 20, (5, 17))
    docs, gold = candidates(r, 5, [], seed=0)
    assert sorted(docs) == sorted([r.docs[i] for i in (0, 1, 2, 5, 17)])
    assert {docs[g] for g in gold} == {r.docs[5], r.docs[17]}
    with pytest.raises(ValueError, match="3 gold passages do not fit in 2"):
        candidates(record(3, 5, (0, 1, 2)), 2, [], seed=0)


def test_records_parse_as_the_stages_read_them():
    r = record(4, 20, (2, 7, 9))
    stage3 = parse_record(retrieval_record(r, 10, []), "stage3", where="x", line=1, index=0)
    assert stage3.answers == r.answers and len(stage3.docs) == 10
    assert {stage3.docs[i] for i in stage3.pos_index} == {r.docs[i] for i in r.pos_index}
    stage2 = parse_record(instruction_record(r, 5, []), "stage2", where="x", line=1, index=0)
    assert len(stage2.docs) == 5 and {r.docs[i] for i in r.pos_index} <= set(stage2.docs)


def test_splits_are_by_position_and_disjoint():
    records = [record(i, 3, (0,)) for i in range(10)]
    split = split_by_position(records, {"train": (0, 6), "dev": (6, 8), "test": (8, 10)})
    assert [r.question for r in split["test"]] == ["question 8?", "question 9?"]
    assert sum(len(v) for v in split.values()) == 10


@pytest.mark.skipif(not SHARED.exists(), reason="shared data not mounted")
def test_the_shared_files_fit_ten_candidates():
    for records in (
        musique_to_retrieval(SHARED / "musique_train.json")[0],
        hotpotqa_to_retrieval(SHARED / "hotpotqa_train.json")[0],
    ):
        pool = passage_pool(records)
        for r in records:
            docs, gold = candidates(r, 10, pool, seed=0)
            assert len(set(docs)) == 10 and len(gold) == len(r.pos_index) >= 2
