"""Batches: deterministic, resumable, process-sharded, in the layouts the objectives expect."""

import numpy as np
import pytest

from clara_jax.data.pipeline import BatchIterator, LayoutConfig, bucket_length
from clara_jax.data.records import CompressionRecord, InstructionRecord, RetrievalRecord
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer

N_MEM = 4


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER_DIR, n_mem=N_MEM)


def _stage1(n=24):
    return [
        CompressionRecord(
            "qa" if i % 3 else "paraphrase",
            f"Doc {i} says the river is {i} km long.",
            (f"How long is river {i}?",) if i % 3 else (),
            (f"{i} km",) if i % 3 else (f"River {i} is {i} km.",),
        )
        for i in range(n)
    ]


LAYOUT = LayoutConfig(
    doc_max_length=32,
    query_max_length=16,
    generator_max_length=192,
    bucket=16,
    docs_per_example=1,
    top_k=2,
    candidates=4,
)


def _iterator(tok, records, stage="stage1", layout=LAYOUT, seed=0):
    return BatchIterator(records, tok, stage, layout, global_size=8, micro_size=4, seed=seed, num_epochs=2)


def test_bucket_lengths():
    assert [bucket_length(n, 32) for n in (1, 32, 33, 64, 65, 200)] == [32, 32, 64, 64, 128, 256]


def test_shapes_and_memory_layout(tok):
    batch = next(_iterator(tok, _stage1()))
    assert batch["enc_ids"].shape[:2] == (2, 4) and batch["gen_ids"].shape[:2] == (2, 4)
    assert (batch["enc_ids"][..., -N_MEM:] == np.asarray(tok.mem_token_ids)).all()  # memory slots last
    assert (batch["enc_ids"].shape[-1] - N_MEM) % 16 == 0 or batch["enc_ids"].shape[-1] - N_MEM == 35
    assert batch["target_mask"].any(axis=-1).all()  # every example has a target
    assert not (batch["target_mask"] & ~batch["gen_mask"]).any()


def test_deterministic_and_resumable(tok):
    a = [next(_iterator(tok, _stage1(), seed=3)) for _ in range(1)]
    it = _iterator(tok, _stage1(), seed=3)
    full = [next(it) for _ in range(5)]
    np.testing.assert_array_equal(a[0]["gen_ids"], full[0]["gen_ids"])
    resumed = _iterator(tok, _stage1(), seed=3)
    for _ in range(2):
        next(resumed)
    state = resumed.state()
    fresh = _iterator(tok, _stage1(), seed=3)
    fresh.restore(state)
    for expected in full[2:]:
        got = next(fresh)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    other = next(_iterator(tok, _stage1(), seed=4))
    assert not np.array_equal(other["gen_ids"], full[0]["gen_ids"])


def test_epochs_end_and_drop_the_tail(tok):
    it = _iterator(tok, _stage1(20))  # 20 // 8 = 2 steps per epoch, 2 epochs
    assert it.total_steps == 4
    assert len(list(it)) == 4
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        _iterator(tok, _stage1(5))


def test_stage2_and_stage3_layouts(tok):
    layout2 = LayoutConfig(**{**LAYOUT.__dict__, "docs_per_example": 3})
    recs2 = [InstructionRecord(f"Q{i}?", tuple(f"doc {i}.{j}" for j in range(3)), f"A{i}") for i in range(8)]
    b2 = next(_iterator(tok, recs2, "stage2", layout2))
    assert b2["enc_ids"].shape[:2] == (2, 12)  # 4 examples x 3 docs per micro-step
    assert ((b2["gen_ids"] == tok.sep_id).sum(-1) == 3).all()
    recs3 = [
        RetrievalRecord(
            f"Q{i}?",
            f"A{i}",
            (f"A{i}",),
            tuple(f"candidate passage number {i}.{j} about rivers" for j in range(3 + i % 2)),
            (i % 3,),
        )
        for i in range(8)
    ]
    b3 = next(_iterator(tok, recs3, "stage3"))
    assert b3["enc_ids"].shape[:2] == (2, 16) and b3["cand_valid"].shape == (2, 4, 4)
    counts = b3["cand_valid"].sum(-1)
    assert set(np.unique(counts)) <= {3, 4}  # 3-candidate questions are padded and masked
    assert (b3["positives"].sum(-1) == 1).all() and not (b3["positives"] & ~b3["cand_valid"]).any()
    assert b3["query_ids"].shape[-1] < b3["enc_ids"].shape[-1]  # queries use their own short length
    assert ((b3["gen_ids"] == tok.sep_id).sum(-1) == 2).all()  # top-k slots in the prompt


def test_questions_are_bucketed_short_and_every_cut_is_counted(tok):
    """Questions pad to their batch's bucketed length; only one beyond query_max_length is cut, and counted."""
    from clara_jax.data.pipeline import tokenize_retrieval

    long_question = "Which " + "very " * 40 + "long river is it?"
    records = [
        RetrievalRecord(q, "A", ("A",), tuple(f"passage {i}.{j}" for j in range(4)), (0,))
        for i, q in enumerate(["Short?", "Also short?", long_question, "Q?"])
    ]
    arrays, stats = tokenize_retrieval(tok, records[:2] + records[3:], LAYOUT)
    assert stats.queries == 3 and stats.queries_truncated == 0
    assert arrays["query_ids"].shape[-1] == LAYOUT.bucket + tok.n_mem  # short: one bucket, not the cap
    arrays, stats = tokenize_retrieval(tok, records, LAYOUT)
    assert stats.queries == 4 and stats.queries_truncated == 1
    assert arrays["query_ids"].shape[-1] == LAYOUT.query_max_length + 3 + tok.n_mem  # the cap
