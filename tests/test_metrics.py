"""Official-parity QA / retrieval metrics (clara_jax.inference.metrics), on hand-made cases.

Line numbers cite apple/ml-clara `evaluation/evaluate.py` (EE) and `openrlhf/trainer/sft_trainer.py`
(ST), whose QA metrics are identical copies.
"""

from __future__ import annotations

import pytest

from clara_jax.inference.metrics import (
    bool_mapping,
    cover_exact_match,
    exact_match,
    f1_score,
    format_table,
    max_over_aliases,
    normalize_answer,
    qa_scores,
    retrieval_scores,
)

# --------------------------------------------------------------------------------------------
# normalisation


def test_normalize_lowercases():
    """EE L59 / ST L56: `text.lower()` is the first step."""
    assert normalize_answer("PaRiS") == "paris"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, world!", "hello world"),
        ("new-york", "newyork"),  # deleted, not replaced by a space
        ("U.S.A.", "usa"),
        ("l'an 2000", "lan 2000"),  # apostrophe removal glues the article to the noun
        ("snake_case", "snakecase"),  # "_" is in string.punctuation
        ("Paris’", "paris’"),  # Unicode punctuation is not in string.punctuation
        ("a–b", "–b"),  # en dash kept, and "a" next to it is still a whole word
    ],
)
def test_normalize_strips_ascii_punctuation_only(raw, expected):
    """EE L55-57 / ST L49-51: delete every char of `set(string.punctuation)`, nothing else."""
    assert normalize_answer(raw) == expected


def test_normalize_articles_whole_words_only():
    """EE L49-50 / ST L43-44: `\\b(a|an|the)\\b` -> " "; "another", "theory", "a1" keep their letters."""
    assert normalize_answer("The Beatles") == "beatles"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("another theory") == "another theory"
    assert normalize_answer("anthem thereby a1") == "anthem thereby a1"


def test_normalize_order_punctuation_before_articles():
    """EE L59: lower -> punc -> articles -> whitespace, so "(a)" and "A." vanish but "the-end" survives."""
    assert normalize_answer("(a) dog") == "dog"
    assert normalize_answer("A.") == ""
    assert normalize_answer("the-end") == "theend"


def test_normalize_collapses_whitespace():
    """EE L52-53 / ST L46-47: `" ".join(text.split())` trims and collapses any whitespace run."""
    assert normalize_answer("  new \t york\n") == "new york"
    assert normalize_answer("the  cat") == "cat"  # the article's replacement space is collapsed too


# --------------------------------------------------------------------------------------------
# bool_mapping and the yes/no/noanswer guard


def test_bool_mapping_exact_strings_only():
    """EE L62-65 / ST L35-38: a dict lookup on the raw string, so only "True"/"False" are mapped."""
    assert bool_mapping("True") == "yes"
    assert bool_mapping("False") == "no"
    for untouched in ("true", "TRUE", " True", "True.", "yes", "Paris"):
        assert bool_mapping(untouched) == untouched


def test_bool_mapping_applies_to_prediction_and_gold():
    """EE L69-70, L75-76, L81-82: both sides go through bool_mapping before normalize_answer."""
    assert exact_match("True", "yes")
    assert exact_match("no", "False")
    assert cover_exact_match("yes", "True")
    assert f1_score("False", "no") == (1.0, 1.0, 1.0)
    # Not mapped, so compared as the word "true": fails, and the gold "yes" triggers the F1 guard.
    assert not exact_match("true", "yes")
    assert not exact_match("True.", "yes")
    assert f1_score("True.", "yes") == (0.0, 0.0, 0.0)


def test_f1_guard_yes_no():
    """EE L85-88 / ST L79-82: F1 = 0 if either side normalises to yes/no/noanswer and they differ."""
    assert f1_score("yes sir", "yes") == (0.0, 0.0, 0.0)  # guard on gold; plain token F1 would be 2/3
    assert f1_score("no", "no way") == (0.0, 0.0, 0.0)  # guard on prediction
    assert f1_score("yes", "no") == (0.0, 0.0, 0.0)
    assert f1_score("No.", "no") == (1.0, 1.0, 1.0)  # equal after normalisation: guard passes


def test_f1_guard_noanswer():
    """EE L85-88: "noanswer" is guarded as one normalised word; "no answer" is two words."""
    assert f1_score("noanswer", "no answer") == (0.0, 0.0, 0.0)
    assert f1_score("the answer", "noanswer") == (0.0, 0.0, 0.0)
    assert f1_score("No-Answer", "noanswer") == (1.0, 1.0, 1.0)  # "-" deleted -> "noanswer"
    # "no answer" vs "no answer here": neither side is exactly a guarded string, ordinary F1.
    f1, p, r = f1_score("no answer here", "no answer")
    assert (p, r) == (2 / 3, 1.0) and f1 == pytest.approx(0.8)


# --------------------------------------------------------------------------------------------
# EM, Cover-EM, F1


def test_exact_match():
    """EE L67-71 / ST L59-63: equality of normalised strings (bool returned)."""
    assert exact_match("The Eiffel Tower!", "eiffel tower") is True
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") is False
    assert exact_match("", "the") is True  # both normalise to ""


def test_cover_em_is_token_containment_not_substring():
    """EE L73-77 / ST L66-70: `all(tok in pred_tokens for tok in gt_tokens)` on normalised tokens."""
    assert cover_exact_match("martial arts", "art") is False  # substring, not a token
    assert cover_exact_match("in New York City", "new york") is True
    assert cover_exact_match("new-york", "new york") is False  # "-" deleted: one token "newyork"
    assert cover_exact_match("1000", "1,000") is True


def test_cover_em_order_and_duplicates():
    """EE L77: membership test per gold token, so order and multiplicity are ignored."""
    assert cover_exact_match("york new", "new york") is True
    assert cover_exact_match("new york", "new new york") is True
    assert cover_exact_match("new", "new york") is False


def test_cover_em_edge_cases():
    """EE L77: `all([])` is True (empty gold is covered by anything); Cover-EM has no yes/no guard."""
    assert cover_exact_match("whatever", "The") is True
    assert cover_exact_match("", "paris") is False
    assert cover_exact_match("no it is not", "no") is True  # while F1 is 0 by the guard
    assert f1_score("no it is not", "no")[0] == 0.0


def test_f1_by_hand():
    """EE L90-102 / ST L84-99: Counter intersection, P = same/|pred|, R = same/|gold|, harmonic mean."""
    # "cat sat on mat" vs "cat on mat": same = 3, P = 3/4, R = 1, F1 = 6/7.
    f1, p, r = f1_score("The cat sat on the mat.", "a cat on a mat")
    assert (p, r) == (0.75, 1.0) and f1 == pytest.approx(6 / 7)
    # Counter & takes min counts: "paris" x3 vs x1 -> same = 1, P = 1/3, R = 1/2, F1 = 0.4.
    f1, p, r = f1_score("Paris paris PARIS", "Paris France")
    assert (p, r) == (1 / 3, 0.5) and f1 == pytest.approx(0.4)
    assert f1_score("Paris", "Paris") == (1.0, 1.0, 1.0)


def test_f1_zero_overlap_and_empty():
    """EE L96-97: `num_same == 0` returns 0 before any division, so F1("", "") = 0 although EM = 1."""
    assert f1_score("London", "Paris") == (0.0, 0.0, 0.0)
    assert f1_score("", "Paris") == (0.0, 0.0, 0.0)
    assert f1_score("Paris", "") == (0.0, 0.0, 0.0)
    assert f1_score("", "the") == (0.0, 0.0, 0.0)
    assert exact_match("", "the")


# --------------------------------------------------------------------------------------------
# aliases and aggregate QA scores


def test_max_over_aliases():
    """Opt-in variant; the official scores `golden_answers[0]` only (EE L191-195)."""
    golds = ["Paris, France", "Paris"]
    assert exact_match("paris", golds[0]) is False
    assert max_over_aliases(exact_match, "paris", golds) is True
    f1, p, r = max_over_aliases(f1_score, "the city of paris", ["France", "Paris", "city of Paris"])
    assert (f1, p, r) == (1.0, 1.0, 1.0)
    assert max_over_aliases(f1_score, "x", ["y", "z"]) == (0.0, 0.0, 0.0)
    assert max_over_aliases(cover_exact_match, "art", "art") is True  # a bare string is one alias
    with pytest.raises(ValueError):
        max_over_aliases(exact_match, "x", [])


PREDS = ["Paris", "True", "the big apple city", ""]
GOLDS = [["paris", "Paris, France"], ["yes"], ["New York", "the big apple"], ["x"]]


def test_qa_scores_official_first_gold_only():
    """EE L184-208: means over questions of f1/acc/em with golden_answers[0]; fractions, not percent."""
    out = qa_scores(PREDS, GOLDS)
    assert list(out) == ["f1", "acc", "em", "avg_output_length"]
    assert out == {"f1": 0.5, "acc": 0.5, "em": 0.5, "avg_output_length": 1.5}


def test_qa_scores_avg_output_length_counts_raw_words():
    """EE L200: `len(prediction.split())` on the raw prediction (articles and punctuation count)."""
    out = qa_scores(["The answer is: Paris .", "  "], ["paris", "x"])
    assert out["avg_output_length"] == (5 + 0) / 2


def test_qa_scores_with_aliases():
    """Each metric is maximised over aliases independently ("big apple" vs "the big apple" alias)."""
    out = qa_scores(PREDS, GOLDS, aliases=True)
    assert out["em"] == 0.5
    assert out["acc"] == 0.75
    assert out["f1"] == pytest.approx((1 + 1 + 0.8 + 0) / 4)
    assert out["avg_output_length"] == 1.5


def test_qa_scores_input_errors():
    """The official crashes on these (IndexError / ZeroDivisionError); we raise a clear ValueError."""
    with pytest.raises(ValueError):
        qa_scores([], [])
    with pytest.raises(ValueError):
        qa_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        qa_scores(["a"], [[]])


# --------------------------------------------------------------------------------------------
# retrieval

TOPK = [[3, 1, 4, 0, 2], [0, 1, 2], [5, 5]]
POS = [[1, 2], [], [5, 5]]


def test_retrieval_scores_average_over_all_questions():
    """EE L214-230: hits = |set(topk[:k]) & set(pos)|; recall 0 for empty pos; precision = hits/k; mean
    over ALL questions. Q2 (no positives) counts as 0; Q3's list (with a duplicate) is shorter than
    k = 3, 5 but precision still divides by k.
    """
    out = retrieval_scores(TOPK, POS)
    expected = {
        "recall@1": (0 + 0 + 1) / 3,
        "recall@3": (0.5 + 0 + 1) / 3,
        "recall@5": (1 + 0 + 1) / 3,
        "precision@1": (0 + 0 + 1) / 3,
        "precision@3": (1 / 3 + 0 + 1 / 3) / 3,
        "precision@5": (2 / 5 + 0 + 1 / 5) / 3,
    }
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def test_retrieval_scores_training_variant_skips_empty_pos():
    """ST L120-140: the training monitor skips questions without positives (not used for the tables)."""
    out = retrieval_scores(TOPK, POS, ks=(1, 5), skip_empty_pos=True)
    assert out == pytest.approx({"recall@1": 0.5, "recall@5": 1.0, "precision@1": 0.5, "precision@5": 0.3})
    assert retrieval_scores([[1]], [[]], ks=(1,), skip_empty_pos=True) == {
        "recall@1": 0.0,
        "precision@1": 0.0,
    }


def test_retrieval_scores_input_errors():
    """Mismatched lengths, k < 1 and an empty question list are rejected."""
    with pytest.raises(ValueError):
        retrieval_scores([[0]], [[0], [1]])
    with pytest.raises(ValueError):
        retrieval_scores([[0]], [[0]], ks=(0,))
    with pytest.raises(ValueError):
        retrieval_scores([], [])


# --------------------------------------------------------------------------------------------
# table


def test_format_table():
    """Per-dataset table: percentages for scores, raw word counts, "-" for missing cells, a mean row."""
    rows = {
        "nq": {"em": 0.5, "f1": 0.625, "avg_output_length": 3.0},
        "hotpotqa": {"em": 0.25, "avg_output_length": 5.0},
    }
    text = format_table(rows, ["em", "f1", "avg_output_length"], scale=100, digits=2, mean_row="avg")
    assert text.splitlines() == [
        "         |    em |    f1 | avg_output_length",
        "---------+-------+-------+------------------",
        "nq       | 50.00 | 62.50 |              3.00",
        "hotpotqa | 25.00 |     - |              5.00",
        "avg      | 37.50 | 62.50 |              4.00",
    ]
