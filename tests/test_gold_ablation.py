"""The reader check: the generator answers from k candidates with every gold passage among them,
then from k with none of them."""

import numpy as np
import pytest

from clara_jax.data.records import RetrievalRecord
from clara_jax.inference.evaluate import evaluate_gold_ablation


class _ReadsGold:
    """A stand-in generator that answers right exactly when its question's gold passage was given.

    A compressed passage is its index in `docs` (everything compressed so far), so the stand-in
    reads back which passages each question was given."""

    def __init__(self, docs=()):
        self.docs = list(docs)
        self.compress_calls = 0

    def compress_documents(self, docs):
        self.compress_calls += 1
        start = len(self.docs)
        self.docs += list(docs)
        return np.arange(start, len(self.docs), dtype=np.float32)[:, None, None], 0.0

    def generate_from_compressed_documents_and_questions(self, questions, compressed, max_new_tokens):
        k = len(compressed) // len(questions)
        given = [
            [self.docs[int(v)] for v in compressed[i * k : (i + 1) * k, 0, 0]] for i in range(len(questions))
        ]
        return [
            q.split()[-1] if f"gold {q.split()[-1]}" in docs else "?" for q, docs in zip(questions, given)
        ]


def _record(i: int, n_docs: int = 8, gold=(2, 5)) -> RetrievalRecord:
    answer = f"a{i}"
    docs = [f"gold {answer}" if j in gold else f"other {i}.{j}" for j in range(n_docs)]
    return RetrievalRecord(
        question=f"q {answer}", answer=answer, answers=(answer,), docs=tuple(docs), pos_index=gold
    )


def test_gold_ablation_gives_every_gold_or_none_and_compresses_each_passage_once():
    reader = _ReadsGold()
    out = evaluate_gold_ablation(reader, [_record(i) for i in range(6)], k=5)
    assert out["n"] == 6
    assert out["scores"]["with_gold"]["em"] == 1.0 and out["scores"]["without_gold"]["em"] == 0.0
    # per question: the gold passage (2 positions, one text) and the first 5 non-gold ones, once each
    assert reader.compress_calls == 1 and len(reader.docs) == 6 * 7


def test_gold_ablation_reads_candidates_already_compressed():
    records = [_record(i) for i in range(3)]
    reader = _ReadsGold(d for r in records for d in r.docs)  # compressed by the reranking already
    memory = np.arange(3 * 8, dtype=np.float32).reshape(3, 8, 1, 1)
    out = evaluate_gold_ablation(reader, records, k=5, memory=memory)
    assert reader.compress_calls == 0 and out["n"] == 3
    assert out["scores"]["with_gold"]["em"] == 1.0 and out["scores"]["without_gold"]["em"] == 0.0
    with pytest.raises(ValueError, match="does not hold"):
        evaluate_gold_ablation(reader, records, k=5, memory=memory[:, :5])


def test_gold_ablation_skips_records_it_cannot_ablate():
    records = [_record(0), _record(1, n_docs=6), RetrievalRecord("q a2", "a2", ("a2",), ("x",) * 8, ())]
    assert evaluate_gold_ablation(_ReadsGold(), records, k=5)["n"] == 1  # 4 non-gold / no gold label
    with pytest.raises(ValueError, match="non-gold"):
        evaluate_gold_ablation(_ReadsGold(), records[1:], k=5)
