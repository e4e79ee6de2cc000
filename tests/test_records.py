"""Record validation (records.py) and readers (sources.py): bad inputs are located, skips are counted."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

from clara_jax.data.records import (
    CompressionRecord,
    InstructionRecord,
    RecordError,
    RetrievalRecord,
    parse_record,
    record_to_dict,
)
from clara_jax.data.sources import (
    ArrayRecordSource,
    hotpotqa_to_retrieval,
    iter_jsonl,
    musique_to_retrieval,
    read_array_record,
    read_hf_dataset,
    read_json_array,
    read_jsonl,
    read_records,
    write_array_record,
)

SHARED = Path("/work/shared/data")
PRETRAIN = SHARED / "clara_pretrain_sample.jsonl"
MUSIQUE = SHARED / "multihop_train" / "musique_train.json"
HOTPOTQA = SHARED / "multihop_train" / "hotpotqa_train.json"
needs_shared = pytest.mark.skipif(not PRETRAIN.exists(), reason="shared data not mounted")


def qa(i: int, **kw) -> dict:
    rec = {
        "data_type": "qa",
        "question": [f"q{i}a", f"q{i}b"],
        "answers": [f"a{i}a", f"a{i}b"],
        "docs": [f"doc {i}"],
    }
    return {**rec, **kw}


def instr(i: int, **kw) -> dict:
    return {**{"question": f"q{i}", "docs": [f"d{i}.{j}" for j in range(5)], "answer": f"a{i}"}, **kw}


def retr(i: int, **kw) -> dict:
    rec = {
        "question": f"q{i}",
        "answer": f"a{i}",
        "docs": [f"d{i}.{j}" for j in range(4)],
        "pos_index": [1, 3],
    }
    return {**rec, **kw}


def without(obj: dict, key: str) -> dict:
    return {k: v for k, v in obj.items() if k != key}


GOOD = {"stage1": qa, "stage2": instr, "stage3": retr}

# (case id, stage, bad line text, field named in the message or None, reason key, reader kwargs)
BAD_CASES = [
    ("malformed_json", "stage3", '{"question": "q", "docs": ["a",', None, "record: malformed JSON", {}),
    ("not_an_object", "stage3", "[1, 2, 3]", None, "record: not an object", {}),
    (
        "missing_question",
        "stage3",
        json.dumps(without(retr(9), "question")),
        "question",
        "question: missing",
        {},
    ),
    ("missing_docs", "stage2", json.dumps(without(instr(9), "docs")), "docs", "docs: missing", {}),
    ("missing_answer", "stage3", json.dumps(without(retr(9), "answer")), "answer", "answer: missing", {}),
    ("question_not_str", "stage3", json.dumps(retr(9, question=7)), "question", "question: wrong type", {}),
    ("docs_not_str_list", "stage2", json.dumps(instr(9, docs=["x", 3])), "docs", "docs: wrong type", {}),
    ("docs_not_list", "stage3", json.dumps(retr(9, docs="one doc")), "docs", "docs: wrong type", {}),
    ("answer_list", "stage3", json.dumps(retr(9, answer=["a"])), "answer", "answer: wrong type", {}),
    (
        "qa_length_mismatch",
        "stage1",
        json.dumps(qa(9, answers=["only one"])),
        "answers",
        "answers: length mismatch",
        {},
    ),
    ("empty_document", "stage1", json.dumps(qa(9, docs=["   "])), "docs", "docs: empty", {}),
    ("empty_candidate", "stage3", json.dumps(retr(9, docs=["a", "", "c", "d"])), "docs", "docs: empty", {}),
    ("empty_question", "stage1", json.dumps(qa(9, question=["q", " "])), "question", "question: empty", {}),
    ("empty_answer", "stage2", json.dumps(instr(9, answer="")), "answer", "answer: empty", {}),
    ("stage1_two_docs", "stage1", json.dumps(qa(9, docs=["a", "b"])), "docs", "docs: wrong count", {}),
    (
        "pos_out_of_range",
        "stage3",
        json.dumps(retr(9, pos_index=[3, 25])),
        "pos_index",
        "pos_index: out of range",
        {},
    ),
    (
        "pos_negative",
        "stage3",
        json.dumps(retr(9, pos_index=[-1])),
        "pos_index",
        "pos_index: out of range",
        {},
    ),
    (
        "pos_not_ints",
        "stage3",
        json.dumps(retr(9, pos_index=[1.0])),
        "pos_index",
        "pos_index: wrong type",
        {},
    ),
    ("pos_bool", "stage3", json.dumps(retr(9, pos_index=[True])), "pos_index", "pos_index: wrong type", {}),
    (
        "pos_duplicate",
        "stage3",
        json.dumps(retr(9, pos_index=[1, 1])),
        "pos_index",
        "pos_index: duplicate",
        {},
    ),
    (
        "too_few_candidates",
        "stage3",
        json.dumps(retr(9, docs=["a", "b"], pos_index=[0])),
        "docs",
        "docs: too few",
        {"min_docs": 3},
    ),
    (
        "wrong_docs_count",
        "stage2",
        json.dumps(instr(9, docs=["a", "b", "c"])),
        "docs",
        "docs: wrong count",
        {"docs_per_example": 5},
    ),
]


def _plus(record: dict, raw_field: str) -> str:
    """The record's JSON with `raw_field` (raw JSON text that json.dumps would not write) added last."""
    return json.dumps(record)[:-1] + ", " + raw_field + "}"


# Hostile JSON: valid for Python's json module, refused as not standard JSON (strict_json.py).
BAD_CASES += [
    ("nan", "stage3", _plus(retr(9), '"score": NaN'), "score", "score: non-standard number", {}),
    ("infinity", "stage3", _plus(retr(9), '"score": -Infinity'), "score", "score: non-standard number", {}),
    ("float_overflow", "stage3", _plus(retr(9), '"score": 1e999'), "score", "score: non-standard number", {}),
    ("duplicate_key", "stage3", _plus(retr(9), '"question": "again?"'), None, "record: duplicate key", {}),
    (
        "nested_duplicate_key",
        "stage3",
        _plus(retr(9), '"meta": {"a": 1, "a": 2}'),
        "meta",
        "meta: duplicate key",
        {},
    ),
    ("huge_integer", "stage3", _plus(retr(9), '"id": ' + "1" * 5000), "id", "id: integer too long", {}),
    ("deep_nesting", "stage3", "[" * 200_000 + "]" * 200_000, None, "record: too deep", {}),
    (
        "nested_past_limit",
        "stage3",
        _plus(retr(9), '"meta": ' + "[" * 100 + "]" * 100),
        "meta",
        "meta: too deep",
        {},
    ),
    (
        "lone_surrogate",
        "stage3",
        json.dumps(retr(9, question="When\ud800?")),
        "question",
        "question: lone surrogate",
        {},
    ),
    (
        "surrogate_in_a_doc",
        "stage3",
        json.dumps(retr(9, docs=["a", "b\udfff", "c", "d"])),
        "docs",
        "docs: lone surrogate",
        {},
    ),
    ("surrogate_key", "stage3", json.dumps({**retr(9), "\ud800": 1}), None, "record: lone surrogate", {}),
]


def write_case(tmp_path: Path, stage: str, bad: str) -> tuple[Path, list[dict]]:
    """good, blank, good, bad, good: the bad record sits on line 4."""
    good = [GOOD[stage](i) for i in range(3)]
    lines = [json.dumps(good[0]), "", json.dumps(good[1]), bad, json.dumps(good[2])]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good


@pytest.mark.parametrize("case, stage, bad, field, reason, kw", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_raises_with_location(tmp_path, case, stage, bad, field, reason, kw):
    path, _ = write_case(tmp_path, stage, bad)
    with pytest.raises(RecordError) as info:
        read_jsonl(path, stage, policy="error", **kw)
    err = info.value
    msg = str(err)
    assert msg.startswith(f"{path}:4: "), msg
    assert (err.source, err.line, err.index, err.field, err.reason) == (str(path), 4, None, field, reason)
    if case == "malformed_json":
        assert msg.endswith("expected a JSON object, got malformed JSON (Expecting value at column 32)")
    elif field is None:
        assert "expected a JSON object" in msg or "expected standard JSON, got " in msg
    else:
        assert f"field '{field}': expected " in msg and ", got " in msg


@pytest.mark.parametrize("case, stage, bad, field, reason, kw", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_skipped_and_counted(tmp_path, caplog, case, stage, bad, field, reason, kw):
    path, good = write_case(tmp_path, stage, bad)
    with caplog.at_level(logging.WARNING, logger="clara_jax.data.sources"):
        records, report = read_jsonl(path, stage, policy="skip", **kw)
    assert records == [parse_record(g, stage) for g in good]
    assert (report.read, report.kept, report.skipped, report.blank_lines) == (4, 3, {reason: 1}, 1)
    assert report.kept + sum(report.skipped.values()) == report.read
    assert len(report.messages) == 1 and report.messages[0].startswith(f"{path}:4: ")
    assert [r.getMessage() for r in caplog.records] == [f"skipped record: {report.messages[0]}"]
    assert f"skipped 1 ({reason} x1)" in report.summary()


def test_exact_messages(tmp_path):
    path, _ = write_case(
        tmp_path, "stage3", json.dumps(retr(9, docs=[f"d{j}" for j in range(20)], pos_index=[3, 25]))
    )
    with pytest.raises(
        RecordError,
        match=r"data\.jsonl:4: field 'pos_index': expected a list of distinct ints in \[0, 20\), got \[3, 25\]$",
    ):
        read_jsonl(path, "stage3")
    with pytest.raises(RecordError) as info:
        parse_record(qa(0, answers=["x"]), "stage1", where="train.jsonl", line=17)
    assert (
        str(info.value)
        == "train.jsonl:17: field 'answers': expected one answer per question, got 2 questions and 1 answers"
    )
    with pytest.raises(RecordError) as info:
        parse_record(instr(0, docs=["x", 3]), "stage2", where="it.json", index=5)
    assert (
        str(info.value)
        == "it.json: record 5: field 'docs': expected a list of non-empty document strings, got int 3 at index 1"
    )
    assert info.value.line == 6


def test_normalisation_rules():
    # Data types other than "paraphrase" take the QA path; a paraphrase has no questions.
    assert parse_record(qa(0, data_type="complex_qa"), "stage1").kind == "qa"
    assert parse_record(without(qa(0), "data_type"), "stage1").kind == "qa"
    para = parse_record(
        {"data_type": "paraphrase", "answers": ["p"], "docs": ["d"], "question": ""}, "stage1"
    )
    assert para == CompressionRecord(kind="paraphrase", doc="d", questions=(), answers=("p",))
    # Documents may come from `context` or `content` (official order: docs, context, content).
    assert parse_record({**without(instr(0), "docs"), "context": ["c"]}, "stage2").docs == ("c",)
    # Stage-3 target: answer, then gold_answer, then golden_answers[0]; aliases kept for metrics.
    gold_only = {**without(retr(0), "answer"), "gold_answer": "g"}
    assert parse_record(gold_only, "stage3").answer == "g"
    both = retr(0, gold_answer="g", golden_answers=["g", "h"])
    assert parse_record(both, "stage3").answers == ("a0", "g", "h")
    assert parse_record({**without(retr(0), "answer"), "golden_answers": ["x", "y"]}, "stage3").answer == "x"
    # Eval gold: golden_answers first (official evaluate.py), no pos_index allowed (no_pos files).
    ev = parse_record({**without(retr(0), "pos_index"), "golden_answers": ["x", "y"]}, "eval")
    assert (ev.answer, ev.answers, ev.pos_index) == ("x", ("x", "y"), ())
    assert parse_record(without(retr(0), "pos_index"), "eval").answers == ("a0",)
    # Stage 2: `answer` (the teacher's) is the target, even when gold_answer is present.
    assert parse_record(instr(0, gold_answer="g"), "stage2").answer == "a0"
    # null counts as absent (HF datasets fills missing columns with null).
    assert parse_record(retr(0, answer=None, gold_answer="g", pos_index=None), "stage3").pos_index == ()
    with pytest.raises(ValueError, match="unknown record kind"):
        parse_record(retr(0), "stage4")


@pytest.mark.parametrize(
    "record",
    [
        CompressionRecord("qa", "d", ("q1", "q2"), ("a1", "a2")),
        CompressionRecord("paraphrase", "d", (), ("p",)),
        InstructionRecord("q", ("d1", "d2"), "a"),
        RetrievalRecord("q", "a", ("a", "b"), ("d1", "d2", "d3"), (2,)),
    ],
)
def test_record_to_dict_round_trip(record):
    stages = {
        CompressionRecord: ["stage1"],
        InstructionRecord: ["stage2"],
        RetrievalRecord: ["stage3", "eval"],
    }
    for stage in stages[type(record)]:
        assert parse_record(json.loads(json.dumps(record_to_dict(record))), stage) == record


def test_iter_jsonl_streams_and_reports(tmp_path):
    path, good = write_case(tmp_path, "stage3", "not json")
    records, report = iter_jsonl(path, "stage3", policy="skip")
    assert report.read == 0  # nothing read until iterated
    assert next(records) == parse_record(good[0], "stage3") and report.read == 1
    assert len(list(records)) == 2 and (report.read, report.kept) == (4, 3)


def test_policy_is_checked(tmp_path):
    path, _ = write_case(tmp_path, "stage3", json.dumps(retr(5)))
    with pytest.raises(ValueError, match="unknown policy"):
        read_jsonl(path, "stage3", policy="ignore")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="unknown record kind"):
        read_jsonl(empty, "stage4")


@needs_shared
def test_real_pretrain_sample():
    records, report = read_records(PRETRAIN, "stage1")
    assert (len(records), report.read, report.kept, report.skipped) == (1000, 1000, 1000, {})
    assert all(r.kind == "qa" and len(r.questions) == len(r.answers) >= 1 for r in records)
    assert all(r.doc.startswith("This a document about ") for r in records)
    assert sum(len(r.questions) for r in records) == 7861


def small_corpus(tmp_path: Path) -> tuple[list[dict], Path]:
    """Stage-3 rows with heterogeneous fields (answer vs gold_answer) to exercise null filling."""
    rows = [
        retr(0),
        retr(1, golden_answers=["a1", "one"]),
        {**without(retr(2), "answer"), "gold_answer": "g2"},
    ]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, path


def test_hf_datasets_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, jsonl = small_corpus(tmp_path)
    expected, _ = read_jsonl(jsonl, "stage3")
    assert expected[2].answer == "g2" and expected[1].answers == ("a1", "one")
    array = tmp_path / "small.json"
    array.write_text(json.dumps(rows))
    parquet = tmp_path / "small.parquet"
    # pa.Table.from_pylist takes its columns from the first row only: give every row every key.
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), parquet)
    cache = tmp_path / "hf_cache"
    for path in (jsonl, array, parquet):
        records, report = read_hf_dataset(path, "stage3", cache_dir=cache)
        assert records == expected and (report.read, report.kept) == (3, 3), path
    assert read_records(parquet, "stage3", cache_dir=cache)[0] == expected
    assert read_records(array, "stage3")[0] == expected
    # A bad row is located by its row index.
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([retr(0), retr(1, pos_index=[7])]), bad)
    with pytest.raises(RecordError, match=r"bad\.parquet: record 1: field 'pos_index'"):
        read_hf_dataset(bad, "stage3", cache_dir=cache)


def test_json_array_errors(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([retr(0), retr(1, question=""), retr(2)]))
    with pytest.raises(
        RecordError, match=r"arr\.json: record 1: field 'question': expected a non-empty string, got ''"
    ):
        read_json_array(path, "stage3")
    records, report = read_json_array(path, "stage3", policy="skip")
    assert records == [parse_record(retr(0), "stage3"), parse_record(retr(2), "stage3")]
    assert report.skipped == {"question: empty": 1}
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(retr(0)) + "\n" + json.dumps(retr(1)) + "\n")
    with pytest.raises(ValueError, match="JSON Lines"):
        read_records(lines, "stage3")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'"):
        read_records(tmp_path / "x.csv", "stage3")


def test_array_record_round_trip(tmp_path):
    import grain

    records = [parse_record(retr(i), "stage3") for i in range(7)]
    path = tmp_path / "corpus.arrayrecord"
    assert write_array_record(records, path) == 7
    read_back, report = read_array_record(path, "stage3", chunk=3)
    assert read_back == records and (report.read, report.kept) == (7, 7)
    assert read_records(path, "stage3")[0] == records

    src = ArrayRecordSource(path, "stage3")
    assert len(src) == 7 and src[4] == records[4] and src[-1] == records[6]
    assert src.__getitems__([5, 0]) == [records[5], records[0]]
    assert list(src) == records  # iteration stops at IndexError
    with pytest.raises(IndexError):
        src[7]
    assert pickle.loads(pickle.dumps(src))[2] == records[2]  # grain workers get a pickled copy

    ds = grain.MapDataset.source(src)
    assert len(ds) == 7 and ds[3] == records[3]
    assert list(ds.map(lambda r: r.question)) == [f"q{i}" for i in range(7)]
    loader = grain.DataLoader(
        data_source=src,
        sampler=grain.samplers.IndexSampler(len(src), shuffle=False, num_epochs=1),
        operations=[],
        worker_count=0,
    )
    assert [r.question for r in loader] == [f"q{i}" for i in range(7)]


def test_array_record_bad_records(tmp_path):
    path = tmp_path / "mixed.array_record"
    write_array_record([retr(0), retr(1, pos_index=[9]), retr(2)], path)
    with pytest.raises(RecordError, match=r"mixed\.array_record: record 1: field 'pos_index'"):
        read_array_record(path, "stage3")
    records, report = read_array_record(path, "stage3", policy="skip")
    assert records == [parse_record(retr(0), "stage3"), parse_record(retr(2), "stage3")]
    assert report.skipped == {"pos_index: out of range": 1} and report.read == 3
    src = ArrayRecordSource(path, "stage3")
    assert src[2] == records[1]
    with pytest.raises(RecordError, match="record 1"):
        src[1]


def check_multihop(records, report, n_docs):
    assert (len(records), report.read, report.kept) == (100, 100, 100)
    for r in records:
        assert isinstance(r, RetrievalRecord) and r.question and r.answers and r.answers[0] == r.answer
        assert len(r.docs) in n_docs and r.pos_index and all(0 <= i < len(r.docs) for i in r.pos_index)


@needs_shared
def test_musique_adapter():
    records, report = musique_to_retrieval(MUSIQUE)
    check_multihop(records, report, {20})
    raw = json.loads(MUSIQUE.read_text())
    for r, obj in zip(records, raw):
        assert r.pos_index == tuple(i for i, p in enumerate(obj["paragraphs"]) if p["is_supporting"])
        assert len(r.pos_index) == len(obj["question_decomposition"])
        assert set(obj["answer_aliases"]) <= set(r.answers)
        p = obj["paragraphs"][r.pos_index[0]]
        assert r.docs[r.pos_index[0]] == f"{p['title']}\n{p['paragraph_text']}"


@needs_shared
def test_hotpotqa_adapter():
    records, report = hotpotqa_to_retrieval(HOTPOTQA)
    check_multihop(records, report, {4, 10})
    raw = json.loads(HOTPOTQA.read_text())
    for r, obj in zip(records, raw):
        titles = [t for t, _ in obj["context"]]
        assert {titles[i] for i in r.pos_index} == {t for t, _ in obj["supporting_facts"]}
        assert r.docs[0].startswith(titles[0] + "\n")


def test_multihop_adapter_errors(tmp_path):
    para = lambda i, sup: {"idx": i, "title": f"T{i}", "paragraph_text": f"text {i}", "is_supporting": sup}
    ok = {
        "question": "q",
        "answer": "a",
        "answer_aliases": ["A"],
        "paragraphs": [para(0, False), para(1, True)],
    }
    path = tmp_path / "musique.json"
    path.write_text(
        json.dumps(
            [ok, {**ok, "answerable": False}, {**ok, "paragraphs": [para(0, True), {"title": "x"}]}, ok]
        )
    )
    with pytest.raises(RecordError, match=r"musique\.json: record 2: field 'paragraphs'"):
        musique_to_retrieval(path)
    records, report = musique_to_retrieval(path, policy="skip")
    assert [r.pos_index for r in records] == [(1,), (1,)] and records[0].answers == ("a", "A")
    assert report.skipped == {"answerable: false": 1, "paragraphs: wrong type": 1} and report.read == 4
    hp = tmp_path / "hotpot.json"
    ctx = [["A", ["x."]], ["B", ["y."]]]
    hp.write_text(
        json.dumps([{"question": "q", "answer": "a", "context": ctx, "supporting_facts": [["C", 0]]}])
    )
    with pytest.raises(
        RecordError,
        match=r"record 0: field 'supporting_facts': expected titles present in 'context', got \['C'\]",
    ):
        hotpotqa_to_retrieval(hp)
