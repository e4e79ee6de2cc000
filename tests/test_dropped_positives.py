"""Stage 3 reads each question's first `data.candidates` documents; a gold passage beyond them is
dropped from training, and that is counted and told, never silent."""

import logging

import pytest

from clara_jax.data.pipeline import LayoutConfig, count_dropped_positives, tokenize_retrieval
from clara_jax.data.records import RetrievalRecord
from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
from clara_jax.data.tokenizer import load_tokenizer

LAYOUT = LayoutConfig(
    doc_max_length=32, query_max_length=16, generator_max_length=192, bucket=16, top_k=2, candidates=4
)


def _record(i: int, pos: tuple, n_docs: int = 8) -> RetrievalRecord:
    return RetrievalRecord(f"Q{i}?", "A", ("A",), tuple(f"passage {i}.{j}" for j in range(n_docs)), pos)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)


def test_positives_beyond_the_candidates_are_counted(tok):
    records = [_record(0, (0,)), _record(1, (5,)), _record(2, (1, 6, 7)), _record(3, (3,), n_docs=4)]
    arrays, stats = tokenize_retrieval(tok, records, LAYOUT)
    assert (stats.positives, stats.positives_dropped, stats.examples_positives_dropped) == (6, 3, 2)
    assert arrays["positives"].sum() == 3  # the ones kept: 0, 1 and 3
    assert count_dropped_positives(records, 8).positives_dropped == 0


def test_dropped_positives_are_warned_with_the_counts(caplog):
    from clara_jax.training.loop import warn_dropped_positives

    stats = count_dropped_positives([_record(0, (0,)), _record(1, (1, 6, 7))], 4)
    with caplog.at_level(logging.WARNING, logger="clara_jax.training.loop"):
        assert warn_dropped_positives(count_dropped_positives([_record(0, (0,))], 4), 4, "t.jsonl") is None
        message = warn_dropped_positives(stats, 4, "train.jsonl")
    assert [r.getMessage() for r in caplog.records if r.name == "clara_jax.training.loop"] == [message]
    assert message.startswith("train.jsonl: 2 of 4 gold passages (pos_index), in 1 of 2 questions")
    assert "data.candidates=4" in message and "raise data.candidates" in message


def test_every_cut_is_warned_at_the_end_of_a_run_with_its_limit_and_counts(tok, caplog):
    """The run's (and the evaluation's) last word on what the layouts cut: questions beyond
    clara.query_max_length among them, as the official limits allow (issue #15 item 4)."""
    from clara_jax.training.loop import warn_truncations

    long_question = " ".join(["word"] * 40)
    records = [_record(0, (0,)), RetrievalRecord(long_question, "A", ("A",), ("passage " * 30,) * 8, (1,))]
    _, stats = tokenize_retrieval(tok, records, LAYOUT)
    assert stats.queries_truncated == 1 and stats.docs_truncated >= 1
    with caplog.at_level(logging.WARNING, logger="clara_jax.training.loop"):
        messages = warn_truncations(stats, "evaluation ")
    assert [r.getMessage() for r in caplog.records if r.name == "clara_jax.training.loop"] == messages
    assert "evaluation questions truncated to clara.query_max_length: 1 of 2" in messages
    assert any(m.startswith("evaluation documents truncated to clara.doc_max_length: ") for m in messages)
    _, clean = tokenize_retrieval(tok, [_record(0, (0,))], LAYOUT)
    assert warn_truncations(clean) == []
