"""End-to-end evaluation of a CLaRa model on retrieval records (question, candidates, gold).

The protocol of the official evaluate.py (CLARA_SPEC §5): the query reasoner ranks the
candidates, the generator answers greedily from the top-k compressed documents in score
order, and answers are scored against the first gold answer (EM, F1, Cover-EM) while the
ranking is scored with Recall@k over all questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clara_jax.inference.clara_model import ClaraInference
from clara_jax.inference.metrics import qa_scores, retrieval_scores


def evaluate_retrieval_qa(
    clara: ClaraInference, records: Sequence, *, k: int | None = None, max_new_tokens: int = 32, ks=(1, 5)
) -> dict:
    """Recall@k of the reranking and EM/F1/Cover-EM of the answers, over `records`."""
    k = k or clara.clara.top_k
    n = min(len(r.docs) for r in records)
    questions = [r.question for r in records]
    candidates = [list(r.docs[:n]) for r in records]
    topk, memory = clara.rerank(questions, candidates, k=min(max(k, *ks), n))
    selected = np.take_along_axis(memory, topk[:, :k, None, None], axis=1)  # score order, as in stage 3
    answers = clara.generate_from_compressed_documents_and_questions(
        questions, selected.reshape(-1, *selected.shape[2:]), max_new_tokens=max_new_tokens
    )
    scores = retrieval_scores(topk.tolist(), [list(r.pos_index) for r in records], ks=ks)
    scores.update(qa_scores(answers, [list(r.answers) for r in records]))
    return {"scores": scores, "answers": answers, "topk": topk}
