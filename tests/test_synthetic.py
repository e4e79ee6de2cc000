"""The synthetic demo corpus: determinism, official record shapes (docs/official_code.md §4), answerability, split hygiene."""

from __future__ import annotations

import hashlib
import itertools
import json
import re

import pytest

from clara_jax.data.synthetic import (
    FILE_NAMES,
    MANIFEST_NAME,
    SyntheticCorpusConfig,
    build_corpus,
    chance_hit_rate,
    chance_recall,
    write_corpus,
)
from clara_jax.formats.jsonl import read_json_lines

CFG = SyntheticCorpusConfig()
N, K = CFG.n_candidates, CFG.docs_per_example
TRAIN_FILES = ("stage1_train", "stage2_train", "stage3_train")
EVAL_FILES = ("stage1_eval", "stage2_eval", "eval_with_pos", "eval_no_pos", "dev_with_pos")
MENTOR_RE = re.compile(r"^(\w+)'s mentor is (\w+)\.$")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    paths = write_corpus(out, CFG)
    return paths, {key: read_json_lines(paths[key]) for key in FILE_NAMES}


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(CFG)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text)


def _is_str_list(x, n: int | None = None) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) and s for s in x) and (n is None or len(x) == n)


def _check_pos(pos, n_docs: int, allow_empty: bool) -> None:
    assert isinstance(pos, list) and all(type(i) is int for i in pos)
    assert all(0 <= i < n_docs for i in pos) and len(set(pos)) == len(pos)
    assert (allow_empty or len(pos) >= 1) and len(pos) <= 2


def check_record(kind: str, r: dict) -> None:
    """A local checker of the shapes the official loaders read (docs/official_code.md §4.1-4.4)."""
    if kind in ("stage1_train", "stage1_eval"):
        assert set(r) == {"data_type", "question", "answers", "docs"}
        assert _is_str_list(r["docs"], 1)
        if r["data_type"] == "qa":
            assert _is_str_list(r["question"]) and _is_str_list(r["answers"])
            assert len(r["question"]) == len(r["answers"]) >= 1
        else:
            assert r["data_type"] == "paraphrase" and r["question"] == ""
            assert _is_str_list(r["answers"], 1)
    elif kind == "stage2_train":
        assert set(r) == {"question", "docs", "gold_answer", "answer"}
        assert (
            isinstance(r["question"], str)
            and isinstance(r["answer"], str)
            and r["answer"] == r["gold_answer"]
        )
        assert _is_str_list(r["docs"], K)
    elif kind == "stage2_eval":
        assert set(r) == {"question", "docs", "gold_answer", "answer", "golden_answers", "pos_index"}
        assert _is_str_list(r["docs"], K) and _is_str_list(r["golden_answers"], 1)
        assert r["answer"] == r["gold_answer"] == r["golden_answers"][0]
        _check_pos(r["pos_index"], K, allow_empty=False)
    elif kind == "stage3_train":
        assert set(r) == {"question", "answer", "docs", "pos_index"}
        assert isinstance(r["question"], str) and isinstance(r["answer"], str) and r["answer"]
        assert _is_str_list(r["docs"], N)
        _check_pos(r["pos_index"], N, allow_empty=False)
    elif kind in ("eval_with_pos", "eval_no_pos", "dev_with_pos"):
        assert set(r) == {"question", "docs", "golden_answers", "pos_index"}
        assert isinstance(r["question"], str) and _is_str_list(r["golden_answers"], 1)
        assert _is_str_list(r["docs"], N)
        _check_pos(r["pos_index"], N, allow_empty=kind == "eval_no_pos")
    elif kind == "corpus":
        assert set(r) == {"id", "text"} and isinstance(r["id"], str) and isinstance(r["text"], str)
    else:
        raise AssertionError(kind)
    if kind not in ("stage1_train", "stage1_eval", "corpus"):
        assert len(set(r["docs"])) == len(r["docs"]), "duplicate candidate"


def _answer(r: dict) -> str:
    return r["answer"] if "answer" in r else r["golden_answers"][0]


def check_recoverable(r: dict) -> None:
    """Single-hop: the answer is in the gold passage, which is about the question's subject.
    Two-hop: the first gold names the linked entity, whose passage (the second gold) holds the answer.
    In no_pos records a gold may be missing; then there is nothing to recover from."""
    q, docs, pos, ans = r["question"], r["docs"], r["pos_index"], _answer(r)
    two_hop = "'s mentor" in q and not q.startswith("Who is")
    if len(pos) != (2 if two_hop else 1):
        assert "golden_answers" in r and "gold_answer" not in r and len(pos) < 2, (
            "gold missing outside no_pos"
        )
        return
    if not two_hop:
        assert ans in _words(docs[pos[0]]) and docs[pos[0]].split()[0] in _words(q)
        return
    first, second = docs[pos[0]], docs[pos[1]]
    subject = q.split("'s mentor")[0].split()[-1]
    assert first.split()[0] == subject
    assert MENTOR_RE.match(first.split(". ")[-1]).group(2) == second.split()[0]
    assert ans in _words(second)


def test_same_seed_byte_identical_and_other_seed_differs(tmp_path, written):
    paths, _ = written
    again = write_corpus(tmp_path / "again", CFG)
    for key, p in paths.items():
        assert p.read_bytes() == again[key].read_bytes(), key
    other = write_corpus(tmp_path / "other", SyntheticCorpusConfig(seed=1))
    for key in FILE_NAMES:
        assert paths[key].read_bytes() != other[key].read_bytes(), key


def test_every_record_has_the_official_shape(written):
    _, files = written
    for key, recs in files.items():
        assert recs, key
        for r in recs:
            check_record(key, r)


def test_every_answer_is_recoverable_from_its_gold(written):
    _, files = written
    for key in ("stage3_train", "eval_with_pos", "stage2_eval", "eval_no_pos", "dev_with_pos"):
        for r in files[key]:
            check_recoverable(r)
    for key in ("stage1_train", "stage1_eval"):
        para = {r["docs"][0]: r["answers"][0] for r in files[key] if r["data_type"] == "paraphrase"}
        for r in files[key]:
            if r["data_type"] == "qa":
                for q, a in zip(r["question"], r["answers"]):
                    assert a in _words(r["docs"][0]) and a in _words(para[r["docs"][0]])
                    assert r["docs"][0].split()[0] in q
    n_two_hop = sum(len(r["pos_index"]) == 2 for r in files["eval_with_pos"])
    assert 0 < n_two_hop < len(files["eval_with_pos"])


def test_stage2_docs_hold_every_gold(corpus):
    by_text = {q.text: q for q in corpus.questions}
    for r in corpus.files["stage2_train"]:
        q = by_text[r["question"]]
        assert all(corpus.passages[g] in r["docs"] for g in q.gold) and not q.held_out


def test_no_eval_question_or_held_out_passage_in_training(written, corpus):
    _, files = written

    def questions(keys):
        out = set()
        for key in keys:
            for r in files[key]:
                out.update(r["question"] if isinstance(r["question"], list) else [r["question"]])
        return out - {""}

    train_q, eval_q = questions(TRAIN_FILES), questions(EVAL_FILES)
    assert eval_q and not train_q & eval_q
    train_docs = {d for key in TRAIN_FILES for r in files[key] for d in r["docs"]}
    held = {p for p, e in zip(corpus.passages, corpus.entities) if e.held_out}
    assert held and not held & train_docs
    assert {r["docs"][0] for r in files["stage1_eval"]} == held
    # Eval pools mix unseen and seen passages, so unfamiliarity does not point at the gold.
    eval_docs = {d for r in files["eval_with_pos"] for d in r["docs"]}
    assert eval_docs & train_docs and eval_docs & held


def test_dev_split_is_its_own_people(corpus):
    """Settings are chosen on dev: no dev question is an eval question, and no eval question has a
    dev person's passage as its gold (dev people's passages may be eval negatives, as any passage)."""
    files = corpus.files
    dev_q = {r["question"] for r in files["dev_with_pos"]}
    assert len(dev_q) >= 100 and not dev_q & {r["question"] for r in files["eval_with_pos"]}
    dev_passages = {p for p, e in zip(corpus.passages, corpus.entities) if e.dev}
    assert dev_passages and all(e.held_out for e in corpus.entities if e.dev)
    for r in files["eval_with_pos"]:
        assert not {r["docs"][i] for i in r["pos_index"]} & dev_passages
    for r in files["dev_with_pos"]:
        assert {r["docs"][i] for i in r["pos_index"]} & dev_passages


def test_stage1_can_see_eval_passages_without_their_questions():
    c = build_corpus(
        SyntheticCorpusConfig(stage1_sees_eval_passages=True, n_stage2_train=10, n_stage3_train=10)
    )
    held = {p for p, e in zip(c.passages, c.entities) if e.held_out}
    s1 = c.files["stage1_train"]
    assert {r["data_type"] for r in s1 if r["docs"][0] in held} == {"paraphrase"}
    train_q = {q for r in s1 if r["data_type"] == "qa" for q in r["question"]}
    assert not train_q & {r["question"] for r in c.files["eval_with_pos"]}


def test_gold_positions_are_spread_over_all_slots(written):
    _, files = written
    for key, n in (("stage3_train", N), ("eval_with_pos", N), ("stage2_train", K)):
        if key == "stage2_train":
            slots = [
                i
                for r in files[key]
                for i, d in enumerate(r["docs"])
                if d.split()[0] in _words(r["question"])
            ]
        else:
            slots = [i for r in files[key] for i in r["pos_index"]]
        assert set(slots) == set(range(n)), key
        assert abs(sum(slots) / len(slots) - (n - 1) / 2) < n / 8, key


def test_manifest_matches_files(written):
    paths, files = written
    manifest = json.loads(paths["manifest"].read_text())
    assert paths["manifest"].name == MANIFEST_NAME
    assert set(manifest["files"]) == set(FILE_NAMES)
    for key, info in manifest["files"].items():
        data = paths[key].read_bytes()
        assert info["records"] == data.count(b"\n") == len(files[key])
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
    assert manifest["files"]["stage2_train"]["records"] == CFG.n_stage2_train
    assert manifest["files"]["stage3_train"]["records"] == CFG.n_stage3_train
    assert manifest["files"]["eval_with_pos"]["records"] == CFG.n_eval
    ch = manifest["chance"]["eval_with_pos"]
    assert ch["recall@1"] == pytest.approx(1 / N) and ch["recall@5"] == pytest.approx(5 / N)
    assert ch["hit@1"] == pytest.approx(
        sum(len(r["pos_index"]) for r in files["eval_with_pos"]) / N / CFG.n_eval
    )
    assert manifest["config"]["seed"] == CFG.seed


def test_chance_recall_on_a_hand_example():
    recs = [
        {"docs": list("abcd"), "pos_index": [0]},
        {"docs": list("abcd"), "pos_index": [1, 2]},
        {"docs": list("abcd"), "pos_index": []},  # counts 0, as in the official average
    ]
    assert chance_recall(recs, 1) == pytest.approx((1 / 4 + 1 / 4 + 0) / 3)
    assert chance_recall(recs, 2) == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert chance_recall(recs, 5) == pytest.approx((1 + 1 + 0) / 3)
    assert chance_hit_rate(recs, 1) == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)

    # Brute force over every ranking of the 4 docs, with the official per-question recall.
    def brute(k, hit=False):
        total = 0.0
        for r in recs:
            pos, perms = set(r["pos_index"]), list(itertools.permutations(range(4)))
            for perm in perms:
                h = len(set(perm[:k]) & pos)
                total += (h > 0) if hit else (h / len(pos) if pos else 0.0)
        return total / len(recs) / len(perms)

    for k in (1, 2, 3):
        assert chance_recall(recs, k) == pytest.approx(brute(k))
        assert chance_hit_rate(recs, k) == pytest.approx(brute(k, hit=True))


def test_passages_are_short_and_the_alphabet_small(written, corpus):
    _, files = written
    assert max(len(p.split()) for p in corpus.passages) <= 30
    assert min(len(p.split()) for p in corpus.passages) >= 8
    names = [e.name for e in corpus.entities]
    assert len(set(names)) == len(names) == CFG.n_entities + CFG.n_distractors
    assert not any(a != b and b.startswith(a) for a in names for b in names)
    chars = set()
    for recs in files.values():
        for r in recs:
            for v in r.values():
                chars.update(
                    "".join(v) if isinstance(v, list) and all(isinstance(s, str) for s in v) else str(v)
                )
    assert len(chars) <= 70, "".join(sorted(chars))


def test_bad_configs_are_rejected():
    for bad in (
        dict(attribute_kinds=("city", "planet")),
        dict(attributes_per_entity=9),
        dict(docs_per_example=1),
        dict(docs_per_example=30),
        dict(values_per_attribute=40),
        dict(eval_entity_fraction=0.0),
    ):
        with pytest.raises(ValueError):
            SyntheticCorpusConfig(**bad)
