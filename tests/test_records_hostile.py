"""Record readers on hostile bytes: every file either reads or raises a located `RecordError`, under
both policies, in bounded time (property-based), and the cases that need bytes or whole files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clara_jax.data import sources
from clara_jax.data.records import DataError, ReadReport, RecordError, parse_record
from clara_jax.data.sources import (
    musique_to_retrieval,
    read_json_array,
    read_jsonl,
    require_records,
)
from clara_jax.formats import strict_json


def retr(i: int, **kw) -> dict:
    return {"question": f"q{i}", "answer": f"a{i}", "docs": [f"d{i}.{j}" for j in range(4)], **kw}


def _lines(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


GOOD = [json.dumps(retr(i)).encode() for i in range(3)]


# ------------------------------------------------------------------------------------------- JSONL


@pytest.mark.parametrize(
    "bad, reason, got",
    [
        (
            b'{"question": "q\xff", "answer": "a"}',
            "record: invalid UTF-8",
            "invalid UTF-8 (byte 0xff at byte offset 15)",
        ),
        (
            bytes(range(1, 10)) + b"\x80\x81",
            "record: invalid UTF-8",
            "invalid UTF-8 (byte 0x80 at byte offset 9)",
        ),
        (b"\x01\x02\x7f{]garbage", "record: malformed JSON", "malformed JSON (Expecting value at column 1)"),
    ],
)
def test_undecodable_jsonl_lines_are_located_and_skippable(tmp_path, bad, reason, got):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_lines(GOOD[0], bad, GOOD[1]))
    with pytest.raises(RecordError) as info:
        read_jsonl(path, "stage3")
    assert str(info.value) == f"{path}:2: expected a JSON object, got {got}"
    records, report = read_jsonl(path, "stage3", policy="skip")
    assert records == [parse_record(retr(0), "stage3"), parse_record(retr(1), "stage3")]
    assert report.skipped == {reason: 1} and report.messages[0].startswith(f"{path}:2: ")


def test_a_line_over_the_limit_is_refused_without_being_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1000)
    long_record = json.dumps(retr(5, docs=["x" * 3000] * 4)).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        _lines(GOOD[0], long_record, GOOD[1], long_record[:2500]).rstrip(b"\n")
    )  # no final newline
    with pytest.raises(
        RecordError,
        match=rf"data\.jsonl:2: expected a record of at most 1,000 bytes on one line, got a line of {len(long_record) + 1:,} bytes$",
    ):
        read_jsonl(path, "stage3")
    records, report = read_jsonl(path, "stage3", policy="skip")
    # The rest of the long line is skipped, so the next line is read as line 3, with its own number.
    assert records == [parse_record(retr(0), "stage3"), parse_record(retr(1), "stage3")]
    assert report.skipped == {"record: line too long": 2} and report.read == 4
    assert [m.split(": ")[0] for m in report.messages] == [f"{path}:2", f"{path}:4"]


# ------------------------------------------------------------------------------------- JSON arrays


def test_hostile_array_elements_are_records_of_their_own(tmp_path):
    elements = [
        json.dumps(retr(0)),
        json.dumps(retr(1))[:-1] + ', "score": NaN}',
        json.dumps(retr(2, question="q\ud800")),
        json.dumps(retr(3))[:-1] + ', "answer": "again"}',
        json.dumps(retr(4)),
    ]
    path = tmp_path / "data.json"
    path.write_text("[\n" + ",\n".join(elements) + "\n]\n")
    with pytest.raises(RecordError) as info:
        read_json_array(path, "stage3")
    assert str(info.value) == (
        f"{path}: record 1: field 'score': expected standard JSON, got the non-standard JSON constant NaN"
    )
    records, report = read_json_array(path, "stage3", policy="skip")
    assert records == [parse_record(retr(0), "stage3"), parse_record(retr(4), "stage3")]
    assert report.skipped == {
        "score: non-standard number": 1,
        "question: lone surrogate": 1,
        "record: duplicate key": 1,
    }
    assert [m.split(": field")[0].split(": expected")[0] for m in report.messages] == [
        f"{path}: record {i}" for i in (1, 2, 3)
    ]


@pytest.mark.parametrize(
    "content, line, got",
    [
        (b"", 1, "malformed JSON (Expecting value at column 1)"),
        (b'[\n{"question": "q"},\n{"question": "\xff"}\n]', 3, "invalid UTF-8 (byte 0xff at byte offset 35)"),
        (
            b'[\n{"a": 1},\n' + b"[" * 200_000 + b"]" * 200_000 + b"\n]",
            3,
            "JSON nested deeper than 64 levels",
        ),
        (b'[\n{"a": 1},\n{"a": \n]', 4, "malformed JSON (Expecting value at column 1)"),
        (b'{"question": "q"}\n{"question": "r"}\n', 2, "several JSON values (JSON Lines?)"),
        (b'{"question": "q"}', 1, "a JSON object"),
    ],
)
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_json_file_that_is_not_an_array_is_refused_at_its_line(tmp_path, content, line, got, policy):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(RecordError) as info:
        read_json_array(path, "stage3", policy=policy)
    assert str(info.value).startswith(f"{path}:{line}: expected ") and got in str(info.value), str(info.value)


def test_multihop_adapters_refuse_hostile_elements_by_index(tmp_path):
    para = {"title": "T", "paragraph_text": "text", "is_supporting": True}
    ok = json.dumps({"question": "q", "answer": "a", "paragraphs": [para]})
    path = tmp_path / "musique.json"
    path.write_text(f'[{ok}, {ok[:-1]}, "answer": "b"}}, {ok}]')
    with pytest.raises(
        RecordError, match=r"musique\.json: record 1: expected standard JSON, got the duplicate key 'answer'"
    ):
        musique_to_retrieval(path)
    records, report = musique_to_retrieval(path, policy="skip")
    assert len(records) == 2 and report.skipped == {"record: duplicate key": 1}


# ------------------------------------------------------------------------------------ enough records


def test_too_few_records_name_the_file_and_the_first_skip(tmp_path):
    report = ReadReport(source="x.jsonl", read=3, kept=1, skipped={"docs: missing": 2})
    report.messages.append("x.jsonl:2: field 'docs': expected ..., got none of them")
    with pytest.raises(DataError) as info:
        require_records([object()], report, at_least=4, purpose="one global batch of 4")
    assert str(info.value) == (
        "x.jsonl: read 3, kept 1, skipped 2 (docs: missing x2); 1 usable records are too few for one global "
        "batch of 4 (needs 4); first skipped: x.jsonl:2: field 'docs': expected ..., got none of them"
    )
    empty = ReadReport(source="e.jsonl", blank_lines=2)
    with pytest.raises(DataError, match=r"^e\.jsonl:3: expected a record, found the end of the file"):
        require_records([], empty, at_least=1, purpose="an evaluation")
    require_records([object()] * 4, report, at_least=4, purpose="anything")  # enough: no error


# --------------------------------------------------------------------------------- property-based

# Bytes that look like JSON often enough to reach past the first character.
JSONISH_BYTES = st.binary(max_size=300) | st.text(
    alphabet=st.sampled_from('[]{}",:\\ \n\t0123456789.eE+-truefalsnNIity"ud800question'), max_size=300
).map(lambda t: t.encode("utf-8", "surrogatepass"))
SURROGATES = st.sampled_from(["\ud800", "x\udfffy", "\udc00"])


def _json_values(strings=st.text(max_size=20)):
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | strings
    return st.recursive(
        leaves,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(strings, kids, max_size=4),
        max_leaves=20,
    )


def _record_like():
    """Dicts with the record fields, each holding any JSON value (often the right type)."""
    anything = _json_values()
    strings = st.lists(st.text(max_size=10), max_size=5)

    def field(right):
        return right | anything

    return st.fixed_dictionaries(
        {},
        optional={
            "question": field(st.text(max_size=10)),
            "answer": field(st.text(max_size=10)),
            "golden_answers": field(strings),
            "docs": field(strings),
            "pos_index": field(st.lists(st.integers(-2, 6), max_size=4)),
        },
    )


def _read_both_policies(path: Path, reader) -> None:
    """Reads, or raises RecordError (policy=error); with skip, everything is accounted for."""
    try:
        reader(path, "stage3")
    except RecordError as err:
        assert str(err).startswith(str(path)), str(err)
    try:
        records, report = reader(path, "stage3", policy="skip")
    except RecordError as err:  # only a file that is not decodable as a whole (JSON arrays)
        assert reader is read_json_array and str(err).startswith(f"{path}:"), str(err)
        return
    assert len(records) == report.kept and report.kept + report.n_skipped == report.read
    assert all(m.startswith(str(path)) for m in report.messages)


@settings(max_examples=120, deadline=2000, database=None)
@given(data=JSONISH_BYTES)
def test_any_bytes_read_or_raise_a_record_error(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("bytes")
    for name, reader in (("data.jsonl", read_jsonl), ("data.json", read_json_array)):
        path = folder / name
        path.write_bytes(data)
        _read_both_policies(path, reader)


@settings(max_examples=120, deadline=2000, database=None)
@given(records=st.lists(_record_like() | _json_values(), min_size=1, max_size=4))
def test_any_json_records_read_or_raise_a_record_error(tmp_path_factory, records):
    folder = tmp_path_factory.mktemp("json")
    jsonl, array = folder / "data.jsonl", folder / "data.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN and Infinity included
    array.write_text(json.dumps(records))
    _read_both_policies(jsonl, read_jsonl)
    _read_both_policies(array, read_json_array)


def _has(value, test) -> bool:
    if isinstance(value, dict):
        return any(test(k) or _has(v, test) for k, v in value.items())
    if isinstance(value, list):
        return any(_has(v, test) for v in value)
    return test(value)


@settings(max_examples=200, deadline=1000, database=None)
@given(value=_json_values(st.text(max_size=10) | SURROGATES))
def test_strict_json_round_trips_standard_json_and_names_the_rest(value):
    text = json.dumps(value)
    has_surrogate = _has(value, lambda v: isinstance(v, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in v))
    non_finite = _has(value, lambda v: isinstance(v, float) and not math.isfinite(v))
    if not (has_surrogate or non_finite):
        assert strict_json.loads_checked(text) == value
        return
    with pytest.raises(strict_json.JsonProblem) as info:
        strict_json.loads_checked(text)
    assert info.value.kind in {"lone surrogate", "non-standard number"}
