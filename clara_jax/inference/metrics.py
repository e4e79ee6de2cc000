"""QA and retrieval metrics that reproduce the official CLaRa evaluation exactly.

The official numbers come from apple/ml-clara `evaluation/evaluate.py` (`EvaluationMetrics`
L38-102, `ResultCalculator.calculate_basic_metrics` / `calculate_stage2_metrics` L184-232); the
trainer keeps an identical copy of the QA metrics (`openrlhf/trainer/sft_trainer.py` L31-99). To
compare with the paper, every detail has to match, including the odd ones:

- `bool_mapping` maps only the exact strings "True"/"False" (no strip, no case folding), is applied
  to prediction AND gold, and runs before normalisation;
- normalisation is lower -> delete ASCII `string.punctuation` (deleted, not replaced by a space, so
  "new-york" becomes "newyork") -> replace whole-word a/an/the by a space -> collapse whitespace;
- "acc" (Cover-EM) is token containment of the normalised gold in the normalised prediction: order
  and multiplicity are ignored, and an empty normalised gold is covered by anything;
- F1 is 0 when either side normalises to "yes"/"no"/"noanswer" and the sides differ, and also 0
  when there is no shared token, even if both sides normalise to "" (where EM is 1);
- only `golden_answers[0]` is scored (`max_over_aliases` / `aliases=True` are opt-in extras);
- recall@k / precision@k are averaged over ALL questions; a question without positives adds 0 to
  recall (and to precision), and precision always divides by k, even when fewer than k ids exist.

All scores are fractions in [0, 1], as the official `results_metrics_*.json` stores them (the
README / paper tables show them x100). `avg_output_length` is the mean number of whitespace words
of the raw (unnormalised) prediction.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "bool_mapping",
    "cover_exact_match",
    "exact_match",
    "f1_score",
    "format_table",
    "max_over_aliases",
    "normalize_answer",
    "qa_scores",
    "retrieval_scores",
]

T = TypeVar("T")

# Deleting (not spacing) exactly the ASCII punctuation of `string.punctuation`; Unicode punctuation
# such as "’" or "–" survives, as in the official code.
_DELETE_PUNCT = str.maketrans("", "", string.punctuation)
# `\b` on a str pattern is Unicode-aware, so "another", "theory" and "a1" keep their letters.
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_BOOL_WORDS = {"True": "yes", "False": "no"}
# Strings on which the official F1 refuses partial credit (HotpotQA convention).
_F1_GUARDED = frozenset({"yes", "no", "noanswer"})


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation in the official order: lower, punctuation, articles, whitespace."""
    s = s.lower().translate(_DELETE_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def bool_mapping(s: str) -> str:
    """Map the exact strings "True"/"False" to "yes"/"no" (2Wiki-style golds); anything else passes."""
    return _BOOL_WORDS.get(s, s)


def _norm(s: str) -> str:
    """Both sides of every official QA metric go through bool_mapping first, then normalisation."""
    return normalize_answer(bool_mapping(s))


def exact_match(pred: str, gold: str) -> bool:
    """Official "em": equality of the normalised strings."""
    return _norm(pred) == _norm(gold)


def cover_exact_match(pred: str, gold: str) -> bool:
    """Official "acc": every normalised gold token is one of the prediction's tokens (not a substring)."""
    pred_tokens = set(_norm(pred).split())
    return all(tok in pred_tokens for tok in _norm(gold).split())


def f1_score(pred: str, gold: str) -> tuple[float, float, float]:
    """Token F1 with the yes/no/noanswer guard; returns (f1, precision, recall).

    The official function returns only f1; precision and recall are exposed for diagnostics and are
    0 whenever the official f1 short-circuits to 0.
    """
    p, g = _norm(pred), _norm(gold)
    if p != g and (p in _F1_GUARDED or g in _F1_GUARDED):
        return 0.0, 0.0, 0.0
    p_tokens, g_tokens = p.split(), g.split()
    same = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if same == 0:  # also covers empty sides: no division by zero, F1("", "") == 0
        return 0.0, 0.0, 0.0
    precision = same / len(p_tokens)
    recall = same / len(g_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def max_over_aliases(metric: Callable[[str, str], T], pred: str, golds: Sequence[str]) -> T:
    """Best score of `pred` against any gold alias (the official code scores golds[0] only).

    For tuple-valued metrics (f1_score) the tuple of the alias with the highest first element wins;
    ties keep the earliest alias.
    """
    if isinstance(golds, str):
        golds = [golds]
    if not golds:
        raise ValueError("max_over_aliases needs at least one gold answer")
    scores = [metric(pred, g) for g in golds]
    return max(scores, key=lambda v: v[0] if isinstance(v, tuple) else v)


def _gold_list(golds: str | Sequence[str], i: int) -> Sequence[str]:
    """A bare string is one gold, mirroring the official fallback to a record's scalar `answer`."""
    if isinstance(golds, str):
        return [golds]
    if len(golds) == 0:
        raise ValueError(f"question {i} has no gold answer (the official code would crash too)")
    return golds


def qa_scores(
    predictions: Sequence[str],
    gold_lists: Sequence[str | Sequence[str]],
    *,
    aliases: bool = False,
) -> dict[str, float]:
    """Official `calculate_basic_metrics`: mean f1, acc (Cover-EM), em and avg_output_length.

    `gold_lists[i]` is question i's `golden_answers` (or a single string). By default only element 0
    is scored, as official; `aliases=True` takes each metric's max over all aliases instead (each
    metric maximised independently). Scores are fractions in [0, 1], not percentages.
    """
    if len(predictions) != len(gold_lists):
        raise ValueError(f"{len(predictions)} predictions but {len(gold_lists)} gold lists")
    if not predictions:
        raise ValueError("qa_scores needs at least one question")

    def score(metric, pred, golds):
        return max_over_aliases(metric, pred, golds) if aliases else metric(pred, golds[0])

    f1 = acc = em = words = 0.0
    for i, (pred, golds) in enumerate(zip(predictions, gold_lists)):
        golds = _gold_list(golds, i)
        f1 += score(f1_score, pred, golds)[0]
        acc += score(cover_exact_match, pred, golds)
        em += score(exact_match, pred, golds)
        words += len(pred.split())  # raw prediction, not normalised
    n = len(predictions)
    return {"f1": f1 / n, "acc": acc / n, "em": em / n, "avg_output_length": words / n}


def retrieval_scores(
    topk_indices: Sequence[Sequence[int]],
    pos_index: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 3, 5),
    *,
    skip_empty_pos: bool = False,
) -> dict[str, float]:
    """Official `calculate_stage2_metrics` retrieval part: mean recall@k and precision@k.

    Per question: hits = |set(topk[:k]) & set(pos)|, recall = hits / |set(pos)| (0 if pos is empty),
    precision = hits / k. The mean is over ALL questions. `skip_empty_pos=True` instead reproduces the
    training-time monitor (sft_trainer.py L107-142), which averages over questions with positives only
    (all zeros if there are none); it is never what the paper tables use.
    """
    if len(topk_indices) != len(pos_index):
        raise ValueError(f"{len(topk_indices)} ranked lists but {len(pos_index)} positive sets")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    recall = dict.fromkeys(ks, 0.0)
    precision = dict.fromkeys(ks, 0.0)
    counted = 0
    for ranked, pos in zip(topk_indices, pos_index):
        gold = set(pos)
        if skip_empty_pos and not gold:
            continue
        counted += 1
        for k in ks:
            hits = len(set(ranked[:k]) & gold)
            recall[k] += hits / len(gold) if gold else 0.0
            precision[k] += hits / k
    if counted == 0 and not skip_empty_pos:
        raise ValueError("retrieval_scores needs at least one question")
    denom = max(counted, 1)
    out = {f"recall@{k}": recall[k] / denom for k in ks}
    out.update({f"precision@{k}": precision[k] / denom for k in ks})
    return out


def format_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str],
    *,
    scale: float = 1.0,
    digits: int = 4,
    unscaled: Collection[str] = ("avg_output_length",),
    mean_row: str | None = None,
) -> str:
    """Plain-text table of per-dataset results (rows = datasets, columns = metric names).

    `scale=100, digits=2` reproduces the README's percentage style; columns in `unscaled` (word
    counts) are never scaled. Missing cells print "-". `mean_row` appends the mean over the rows
    that have the metric (the README's "Avg" column, transposed).
    """

    def cell(col: str, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool | int | float):
            return f"{value * (1.0 if col in unscaled else scale):.{digits}f}"
        return str(value)

    body = [[name, *(cell(c, metrics.get(c)) for c in columns)] for name, metrics in rows.items()]
    if mean_row is not None:
        means = []
        for c in columns:
            vals = [m[c] for m in rows.values() if isinstance(m.get(c), bool | int | float)]
            means.append(cell(c, sum(vals) / len(vals)) if vals else "-")
        body.append([mean_row, *means])
    table = [["", *columns], *body]
    widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]

    def line(r: list[str]) -> str:
        first = r[0].ljust(widths[0])
        return " | ".join([first, *(v.rjust(w) for v, w in zip(r[1:], widths[1:]))]).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in body)])
