"""The reader check: the generator answers from k candidates with every gold passage among them,
then from k with none of them."""

import numpy as np
import pytest

from clara_jax.data.records import RetrievalRecord
from clara_jax.inference.evaluate import evaluate_gold_ablation


class _ReadsGold:
    """A stand-in generator that answers right exactly when its question's gold passage was given."""

    def __init__(self):
        self.docs = []

    def compress_documents(self, docs):
        self.docs = list(docs)
        return np.arange(len(docs), dtype=np.float32)[:, None, None]

    def generate_from_compressed_documents_and_questions(self, questions, compressed, max_new_tokens):
        k = len(compressed) // len(questions)
        given = [self.docs[i * k : (i + 1) * k] for i in range(len(questions))]
        return [
            q.split()[-1] if f"gold {q.split()[-1]}" in docs else "?" for q, docs in zip(questions, given)
        ]


def _record(i: int, n_docs: int = 8, gold=(2, 5)) -> RetrievalRecord:
    answer = f"a{i}"
    docs = [f"gold {answer}" if j in gold else f"other {i}.{j}" for j in range(n_docs)]
    return RetrievalRecord(
        question=f"q {answer}", answer=answer, answers=(answer,), docs=tuple(docs), pos_index=gold
    )


def test_gold_ablation_gives_every_gold_or_none():
    reader = _ReadsGold()
    out = evaluate_gold_ablation(reader, [_record(i) for i in range(6)], k=5)
    assert out["n"] == 6
    assert out["scores"]["with_gold"]["em"] == 1.0 and out["scores"]["without_gold"]["em"] == 0.0
    # the last call was the no-gold one: 5 non-gold candidates per question
    assert len(reader.docs) == 30 and not any(d.startswith("gold") for d in reader.docs)


def test_gold_ablation_skips_records_it_cannot_ablate():
    records = [_record(0), _record(1, n_docs=6), RetrievalRecord("q a2", "a2", ("a2",), ("x",) * 8, ())]
    assert evaluate_gold_ablation(_ReadsGold(), records, k=5)["n"] == 1  # 4 non-gold / no gold label
    with pytest.raises(ValueError, match="non-gold"):
        evaluate_gold_ablation(_ReadsGold(), records[1:], k=5)
