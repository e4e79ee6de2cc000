"""End-to-end evaluation of a CLaRa model on retrieval records (question, candidates, gold).

The protocol of the official evaluate.py (docs/official_code.md §5): the query reasoner ranks
every candidate of a record, the generator answers greedily from the top-k compressed documents in
score order, and answers are scored against the first gold answer (EM, F1, Cover-EM) while the
ranking is scored with Recall@k over all questions. Records may hold different numbers of
candidates: each keeps all of its own (the shorter ones are padded with candidates that are masked
out of the ranking). The default answer lengths are the official evaluation's: 64 new tokens when
reranking (its stage 2), 128 when answering from given documents (its stages 1 and 1_2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clara_jax.inference.clara_model import ClaraInference
from clara_jax.inference.metrics import qa_scores, retrieval_scores

# `max_new_tokens` of the official evaluate.py: stage 2 passes 64 to generate_from_questions, stages
# 1/1_2 leave generate_from_compressed_documents_and_questions at its default of 128.
OFFICIAL_MAX_NEW_TOKENS = {"rerank": 64, "given": 128}


def evaluate_retrieval_qa(
    clara: ClaraInference,
    records: Sequence,
    *,
    k: int | None = None,
    max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS["rerank"],
    ks=(1, 5),
) -> dict:
    """Recall@k of the reranking and EM/F1/Cover-EM of the answers, over `records`.

    Every candidate of every record is ranked (records need at least k each, not the same count);
    `memory` [B, N, n_mem, D] holds them, N the most any record has, zeros in the padding slots."""
    k = k or clara.clara.top_k
    fewest = min(len(r.docs) for r in records)
    questions = [r.question for r in records]
    candidates = [list(r.docs) for r in records]
    topk, memory = clara.rerank(questions, candidates, k=max(k, min(max(ks), fewest)))
    selected = np.take_along_axis(memory, topk[:, :k, None, None], axis=1)  # score order, as in stage 3
    answers = clara.generate_from_compressed_documents_and_questions(
        questions, selected.reshape(-1, *selected.shape[2:]), max_new_tokens=max_new_tokens
    )
    scores = retrieval_scores(topk.tolist(), [list(r.pos_index) for r in records], ks=ks)
    scores.update(qa_scores(answers, [list(r.answers) for r in records]))
    return {"scores": scores, "answers": answers, "topk": topk, "memory": memory}


def evaluate_given_documents(
    clara: ClaraInference, records: Sequence, *, k: int = 5, max_new_tokens: int = 128
) -> dict:
    """The official compressor evaluation (stages 1-2): answer from `docs[:k]` in file order."""
    usable = [r for r in records if len(r.docs) >= k]
    if len(usable) != len(records):
        raise ValueError(f"{len(records) - len(usable)} records have fewer than k={k} documents")
    answers = clara.generate_from_text(
        [r.question for r in records], [list(r.docs[:k]) for r in records], max_new_tokens=max_new_tokens
    )
    return {"scores": qa_scores(answers, [list(r.answers) for r in records]), "answers": answers}


def evaluate_gold_ablation(
    clara: ClaraInference,
    records: Sequence,
    *,
    k: int = 5,
    max_new_tokens: int = 32,
    seed: int = 0,
    memory: np.ndarray | None = None,
) -> dict:
    """Does the generator read its documents? It answers each question twice from k compressed
    candidates: once with every gold passage among them (the rest non-gold, shuffled), once with
    none. Equal scores mean the answers come from the question alone, and then stage 3's LM loss
    carries almost no signal about which passages to retrieve.

    `memory` [B, N, n_mem, D]: every candidate of `records` already compressed (as
    `evaluate_retrieval_qa` returns it), so none is compressed again; without it, each passage the
    two runs read is compressed once."""
    rng = np.random.default_rng(seed)
    usable, slots = [], {"with_gold": [], "without_gold": []}
    for i, r in enumerate(records):
        gold = sorted(set(r.pos_index))
        others = [j for j in range(len(r.docs)) if j not in gold]
        if not gold or len(others) < k:
            continue
        picked = gold[:k] + others[: k - len(gold[:k])]
        rng.shuffle(picked)
        usable.append(i)
        slots["with_gold"].append(picked)
        slots["without_gold"].append(others[:k])
    if not usable:
        raise ValueError(f"no record has gold passages (pos_index) and at least {k} non-gold candidates")
    if memory is None:
        needed = sorted({(i, j) for rows in slots.values() for i, js in zip(usable, rows) for j in js})
        memory_of_needed, _ = clara.compress_documents([records[i].docs[j] for i, j in needed])
        vectors = dict(zip(needed, memory_of_needed))
    else:
        width = max(len(r.docs) for r in records)
        if memory.shape[:2] != (len(records), width):
            raise ValueError(
                f"memory {memory.shape[:2]} does not hold the {len(records)} x {width} candidates"
            )
        vectors = {(i, j): memory[i, j] for rows in slots.values() for i, js in zip(usable, rows) for j in js}
    questions = [records[i].question for i in usable]
    golds = [list(records[i].answers) for i in usable]
    scores = {}
    for name, rows in slots.items():
        selected = np.stack([vectors[i, j] for i, js in zip(usable, rows) for j in js])
        answers = clara.generate_from_compressed_documents_and_questions(
            questions, selected, max_new_tokens=max_new_tokens
        )
        scores[name] = qa_scores(answers, golds)
    return {"scores": scores, "n": len(usable)}


def read_eval_file(path: str, *, k: int = 5, limit: int | None = None, policy: str = "error") -> list:
    """The records of one evaluation file (official formats, with or without `pos_index`), each with at
    least `k` candidates; a file that leaves none raises a `DataError` naming it."""
    from clara_jax.data.sources import read_records, require_records

    records, report = read_records(path, "eval", policy=policy, min_docs=k)
    require_records(records, report, at_least=1, purpose="an evaluation")
    return records[:limit] if limit else records


def evaluate_records(
    clara: ClaraInference,
    records: Sequence,
    *,
    mode: str = "rerank",
    k: int = 5,
    max_new_tokens: int | None = None,
) -> dict:
    """Scores of evaluation records in `mode` (rerank: stage-3 evaluation; given: docs[:k] in order).
    `max_new_tokens` None: the official evaluation's value for the mode (OFFICIAL_MAX_NEW_TOKENS)."""
    if mode not in OFFICIAL_MAX_NEW_TOKENS:
        raise ValueError(
            f"mode={mode!r}: expected 'rerank' (stage-3 evaluation) or 'given' (docs[:k] in order)"
        )
    if max_new_tokens is None:
        max_new_tokens = OFFICIAL_MAX_NEW_TOKENS[mode]
    if mode == "rerank":
        return evaluate_retrieval_qa(
            clara, records, k=k, max_new_tokens=max_new_tokens, ks=tuple(sorted({1, min(3, k), k}))
        )
    return evaluate_given_documents(clara, records, k=k, max_new_tokens=max_new_tokens)


# --- paraphrase quality (the official `stage1_paraphrase` evaluation) ----------------------------

# The official evaluation calls generate_from_paraphrase with its default answer length.
PARAPHRASE_MAX_NEW_TOKENS = 128


def read_paraphrase_file(path: str, *, limit: int | None = None, policy: str = "error") -> list[str]:
    """The passages of a stage-1 (SCP) file, one per record (`docs: [passage]`, with its QA pairs or
    as `data_type: "paraphrase"`); a file that leaves none raises a `DataError` naming it."""
    from clara_jax.data.sources import read_records, require_records

    records, report = read_records(path, "stage1", policy=policy)
    require_records(records, report, at_least=1, purpose="a paraphrase evaluation")
    docs = [r.doc for r in records]
    return docs[:limit] if limit else docs


def evaluate_paraphrase(
    clara: ClaraInference,
    documents: Sequence[str],
    *,
    max_new_tokens: int = PARAPHRASE_MAX_NEW_TOKENS,
    bertscore=None,
    seed: int | None = 0,
) -> dict:
    """The official paraphrase evaluation: each passage is compressed alone, the generator rebuilds
    it from its memory tokens (`generate_from_paraphrase`, one question per passage, the instruction
    template drawn with `seed`; None = Python's global generator, as the official run), and the
    paraphrase is scored against the passage itself (paraphrase_metrics: ROUGE-1, ROUGE-L, the
    approximate entity preservation, BERTScore with a `BertScorer`). Scores are means over passages,
    with `n` the number of passages."""
    from clara_jax.inference.paraphrase_metrics import paraphrase_scores

    documents = list(documents)
    if not documents:
        raise ValueError("no passages to paraphrase")
    paraphrases = clara.generate_from_paraphrase(
        [""] * len(documents), [[doc] for doc in documents], max_new_tokens, rng=seed
    )
    scores = paraphrase_scores(paraphrases, documents, bertscore=bertscore)
    return {
        "scores": {**scores.means, "n": len(documents)},
        "paraphrases": paraphrases,
        "per_record": scores.per_pair,
    }
