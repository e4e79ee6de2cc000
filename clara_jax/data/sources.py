"""Readers that turn files into validated records, with an exact account of what was dropped.

Every reader goes through `parse_record` (records.py) and one policy:
- `policy="error"` (default): the first bad record raises its `RecordError`, whose message alone
  (`path:17: field 'pos_index': expected ..., got ...`) is enough to fix the file;
- `policy="skip"`: the bad record is counted in the `ReadReport` under its reason, logged as a
  warning with the full message, and reading continues. Nothing is dropped silently:
  `report.kept + sum(report.skipped.values()) == report.read`.

Formats: JSONL (streamed by `clara_jax.formats.jsonl`, exact line numbers), JSON arrays, Parquet /
JSON through HF `datasets` (local files only), and ArrayRecord for large corpora (written by
`write_array_record`, one JSON record per entry), whose `ArrayRecordSource` is a random-access
source that grain pipelines read directly. The multi-hop adapters turn the shared MuSiQue /
HotpotQA training files (their own formats) into stage-3 `RetrievalRecord`s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from clara_jax.data.records import (
    RECORD_KINDS,
    DataError,
    ReadReport,
    Record,
    RecordError,
    location,
    parse_record,
    record_to_json,
    short_repr,
)
from clara_jax.file_io import atomic_file
from clara_jax.formats import jsonl, strict_json

logger = logging.getLogger(__name__)

POLICIES = ("error", "skip")
ARRAY_RECORD_SUFFIXES = (".arrayrecord", ".array_record")
# One JSONL line (one record) at most: a stage-3 record with 50 long candidates is well under 1 MiB,
# and a line without a newline must not be read into memory whole.
MAX_LINE_BYTES = 8 << 20
PathLike = str | os.PathLike

# One item of a raw stream: (line, index, raw object or the RecordError met while decoding it).
_Raw = tuple[int | None, int | None, Any]


def _check_args(policy: str, stage: str) -> None:
    """Fail before reading, not at the first record (an empty file would never fail)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if stage not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {stage!r}; expected one of {RECORD_KINDS}")


def _validated(
    raw: Iterable[_Raw],
    stage: str,
    report: ReadReport,
    policy: str,
    *,
    source: str,
    min_docs: int | None = None,
    docs_per_example: int | None = None,
    convert: Callable[[Any, int | None, int | None], Any] | None = None,
) -> Iterator[Record]:
    """Apply the policy to a raw stream; the single place where records are kept or skipped."""
    _check_args(policy, stage)
    for line, index, obj in raw:
        report.read += 1
        try:
            if isinstance(obj, RecordError):
                raise obj
            if convert is not None:
                obj = convert(obj, line, index)
            record = parse_record(
                obj,
                stage,
                where=source,
                line=line,
                index=index,
                min_docs=min_docs,
                docs_per_example=docs_per_example,
            )
        except RecordError as err:
            if policy == "error":
                raise
            report.add_skip(err)
            logger.warning("skipped record: %s", err)
            continue
        report.kept += 1
        yield record


def _problem_error(
    problem: strict_json.JsonProblem,
    source: str,
    line: int | None,
    index: int | None,
    expected: str = "a JSON object",
    got: str | None = None,
) -> RecordError:
    """The record error for a JSON problem: a syntax problem misses `expected`; a value that decodes
    but is not allowed (NaN, a duplicate key, a lone surrogate, ...) misses standard JSON."""
    return RecordError(
        source=source,
        line=line,
        index=index,
        field=problem.field,
        expected=expected if problem.kind in _SHAPE_PROBLEMS else "standard JSON",
        got=got or problem.got,
        reason=problem.kind,
    )


_SHAPE_PROBLEMS = ("malformed JSON", "invalid UTF-8", "not an array")


def _decode(data: bytes | str, source: str, line: int | None, index: int | None) -> Any:
    """One record's JSON, or the `RecordError` that says why it is not (returned, for the policy)."""
    try:
        return jsonl.decode(data, strict=True)
    except strict_json.JsonProblem as problem:
        return _problem_error(problem, source, line, index)


# --- JSONL ---------------------------------------------------------------------------------------


def _too_long(source: str, line: int, size: str) -> RecordError:
    return RecordError(
        source=source,
        line=line,
        field=None,
        expected=f"a record of at most {MAX_LINE_BYTES:,} bytes on one line",
        got=f"a line of {size} bytes",
        reason="line too long",
    )


def _jsonl_raw(path: PathLike, report: ReadReport) -> Iterator[_Raw]:
    source = str(path)

    def blank(_line: int) -> None:
        report.blank_lines += 1

    for line_no, data in jsonl.lines(path, max_bytes=MAX_LINE_BYTES, on_blank=blank):
        if isinstance(data, jsonl.TooLong):
            yield line_no, None, _too_long(source, line_no, f"{data.size:,}")
        else:
            yield line_no, None, _decode(data, source, line_no, None)


def iter_jsonl(
    path: PathLike,
    stage: str,
    *,
    policy: str = "error",
    min_docs: int | None = None,
    docs_per_example: int | None = None,
) -> tuple[Iterator[Record], ReadReport]:
    """Stream a JSONL file: the report is complete once the iterator is exhausted."""
    _check_args(policy, stage)
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    report = ReadReport(source=str(path))
    records = _validated(
        _jsonl_raw(path, report),
        stage,
        report,
        policy,
        source=str(path),
        min_docs=min_docs,
        docs_per_example=docs_per_example,
    )
    return records, report


def read_jsonl(
    path: PathLike,
    stage: str,
    *,
    policy: str = "error",
    min_docs: int | None = None,
    docs_per_example: int | None = None,
) -> tuple[list[Record], ReadReport]:
    records, report = iter_jsonl(
        path, stage, policy=policy, min_docs=min_docs, docs_per_example=docs_per_example
    )
    return list(records), report


# --- JSON arrays ---------------------------------------------------------------------------------


def _load_json_array(path: PathLike) -> list:
    """The file's elements, each a raw record or the `RecordError` that rejects it (`path: record N`).

    A file that is not a JSON array as a whole raises its `RecordError` at the file line that shows
    it (invalid UTF-8, malformed or too deeply nested JSON, several values, not an array): no policy
    can skip part of a file that cannot be decoded."""
    source = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    data = Path(path).read_bytes()

    def file_error(problem: strict_json.JsonProblem, line: int, got: str | None = None) -> RecordError:
        return _problem_error(problem, source, line, None, expected="a JSON array of records", got=got)

    try:
        text = strict_json.decode_utf8(data)
    except strict_json.JsonProblem as problem:
        raise file_error(problem, data.count(b"\n", 0, problem.pos) + 1) from None
    try:
        value = strict_json.loads(text)
    except strict_json.JsonProblem as problem:
        line = None if problem.pos is None else text.count("\n", 0, problem.pos) + 1
        got = None
        if problem.got.startswith("malformed JSON (Extra data"):
            got = "several JSON values (JSON Lines?); name the file .jsonl or read it with read_jsonl"
        raise file_error(problem, line or 1, got) from None
    if not isinstance(value, list):
        kind = {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
        raise file_error(strict_json.JsonProblem(f"a JSON {kind}", "not an array"), 1)
    elements = []
    for i, element in enumerate(value):
        try:
            elements.append(strict_json.check(element))
        except strict_json.JsonProblem as problem:
            elements.append(_problem_error(problem, source, None, i))
    return elements


def read_json_array(
    path: PathLike,
    stage: str,
    *,
    policy: str = "error",
    min_docs: int | None = None,
    docs_per_example: int | None = None,
) -> tuple[list[Record], ReadReport]:
    """A `.json` file holding a list of records; errors say `path: record N` (0-based, as `data[N]`)."""
    _check_args(policy, stage)
    report = ReadReport(source=str(path))
    raw = ((i + 1, i, obj) for i, obj in enumerate(_load_json_array(path)))
    kw = dict(source=str(path), min_docs=min_docs, docs_per_example=docs_per_example)
    return list(_validated(raw, stage, report, policy, **kw)), report


# --- HF datasets (Parquet / JSON) ----------------------------------------------------------------

_HF_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def read_hf_dataset(
    path_or_files: PathLike | Sequence[PathLike] | Any,
    stage: str,
    *,
    policy: str = "error",
    min_docs: int | None = None,
    docs_per_example: int | None = None,
    cache_dir: PathLike | None = None,
) -> tuple[list[Record], ReadReport]:
    """Local Parquet / JSON(L) files through HF `datasets` (never the hub), or a loaded `Dataset`.

    Rows are validated like JSONL lines, with the row index as the record index. Columns missing
    from some rows come back as null, which `parse_record` treats as absent.
    """
    _check_args(policy, stage)
    import datasets

    if isinstance(path_or_files, datasets.Dataset):
        dataset, source = path_or_files, "<datasets.Dataset>"
    else:
        files = [path_or_files] if isinstance(path_or_files, str | os.PathLike) else list(path_or_files)
        if not files:
            raise DataError("read_hf_dataset: no files given")
        files = [str(f) for f in files]
        builders = {_HF_BUILDERS.get(Path(f).suffix.lower()) for f in files}
        if None in builders or len(builders) != 1:
            raise DataError(
                f"read_hf_dataset: files must all be .parquet, or all .json/.jsonl; got {short_repr(files)}"
            )
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f)
        source = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)"
        try:
            dataset = datasets.load_dataset(
                builders.pop(),
                data_files=files,
                split="train",
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        except Exception as exc:  # arrow schema errors etc.: point at the per-line reader
            raise DataError(
                f"{source}: HF datasets could not load it ({type(exc).__name__}: {exc}); "
                "read_jsonl / read_json_array validate it record by record"
            ) from exc
    report = ReadReport(source=source)
    raw = ((i + 1, i, row) for i, row in enumerate(dataset))
    kw = dict(source=source, min_docs=min_docs, docs_per_example=docs_per_example)
    return list(_validated(raw, stage, report, policy, **kw)), report


# --- ArrayRecord -------------------------------------------------------------------------------


def write_array_record(
    records_or_dicts: Iterable[Record | dict], path: PathLike, *, options: str = "group_size:1"
) -> int:
    """Write each record as JSON bytes (records in their official dict form, dicts as given).

    `group_size:1` makes every record its own chunk, so random access (grain) reads one record,
    not a whole group. The file appears atomically under `path` once complete. Returns the count.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    n = 0
    with atomic_file(path) as tmp:
        writer = ArrayRecordWriter(tmp, options)
        try:
            for item in records_or_dicts:
                writer.write(record_to_json(item).encode("utf-8"))
                n += 1
        finally:
            writer.close()
    return n


def _paths(path_or_paths: PathLike | Sequence[PathLike]) -> list[str]:
    if isinstance(path_or_paths, str | os.PathLike):
        return [str(path_or_paths)]
    return [str(p) for p in path_or_paths]


def _label(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"


def read_array_record(
    path: PathLike | Sequence[PathLike],
    stage: str,
    *,
    policy: str = "error",
    min_docs: int | None = None,
    docs_per_example: int | None = None,
    chunk: int = 1024,
) -> tuple[list[Record], ReadReport]:
    """Read ArrayRecord file(s) sequentially; errors say `path: record N` (global 0-based index)."""
    from array_record.python.array_record_module import ArrayRecordReader

    _check_args(policy, stage)
    paths = _paths(path)
    source = _label(paths)

    def raw() -> Iterator[_Raw]:
        offset = 0
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(p)
            reader = ArrayRecordReader(p)
            try:
                n = reader.num_records()
                for start in range(0, n, chunk):
                    for i, data in enumerate(reader.read(start, min(start + chunk, n)), start=offset + start):
                        yield i + 1, i, _decode(data, source, i + 1, i)
            finally:
                reader.close()
            offset += n

    report = ReadReport(source=source)
    kw = dict(source=source, min_docs=min_docs, docs_per_example=docs_per_example)
    return list(_validated(raw(), stage, report, policy, **kw)), report


class ArrayRecordSource:
    """Random-access records over ArrayRecord file(s): `len(src)`, `src[i]` -> parsed record.

    It is grain's data-source protocol (`__len__`, `__getitem__`, `__getitems__`), so
    `grain.MapDataset.source(src)` and `grain.DataLoader(data_source=src, ...)` read it directly;
    it pickles for grain's worker processes. A bad record raises its `RecordError` on access
    (random access cannot skip without changing the length): validate once with
    `read_array_record(..., policy=...)`, or write only parsed records.
    """

    def __init__(
        self,
        path: PathLike | Sequence[PathLike],
        stage: str,
        *,
        min_docs: int | None = None,
        docs_per_example: int | None = None,
    ):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        _check_args("error", stage)
        self.paths = _paths(path)
        for p in self.paths:
            if not Path(p).is_file():
                raise FileNotFoundError(p)
        self.stage = stage
        self.min_docs = min_docs
        self.docs_per_example = docs_per_example
        self._source = ArrayRecordDataSource(self.paths)
        self._label = _label(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def _parse(self, index: int, data: bytes) -> Record:
        obj = _decode(data, self._label, index + 1, index)
        if isinstance(obj, RecordError):
            raise obj
        return parse_record(
            obj,
            self.stage,
            where=self._label,
            line=index + 1,
            index=index,
            min_docs=self.min_docs,
            docs_per_example=self.docs_per_example,
        )

    def _index(self, index: int) -> int:
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"record index {index} out of range for {n} records")
        return i

    def __getitem__(self, index: int) -> Record:
        i = self._index(index)
        return self._parse(i, self._source[i])

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        idx = [self._index(i) for i in indices]
        return [self._parse(i, data) for i, data in zip(idx, self._source.__getitems__(idx))]

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self._label!r}, stage={self.stage!r}, len={len(self)})"


# --- dispatch ------------------------------------------------------------------------------------


def require_records(records: Sequence[Record], report: ReadReport, *, at_least: int, purpose: str) -> None:
    """Fail with the reader's account when too few records survived reading for `purpose`.

    With `policy="skip"` a file whose records are all bad reads as "nothing": this turns that into
    a `DataError` naming the file, what was skipped and the first skipped record's own error."""
    if len(records) >= at_least:
        return
    if report.read == 0:
        raise DataError(
            f"{location(report.source, report.blank_lines + 1)}: expected a record, "
            "found the end of the file (it holds no records)"
        )
    text = f"{report.summary()}; {len(records)} usable records are too few for {purpose} (needs {at_least})"
    if report.messages:
        text += f"; first skipped: {report.messages[0]}"
    raise DataError(text)


def read_records(path: PathLike, stage: str, **kw: Any) -> tuple[list[Record], ReadReport]:
    """Read any supported file by its extension (keywords go to the format's reader)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, stage, **kw)
    if suffix == ".json":
        return read_json_array(path, stage, **kw)
    if suffix == ".parquet":
        return read_hf_dataset(path, stage, **kw)
    if suffix in ARRAY_RECORD_SUFFIXES:
        return read_array_record(path, stage, **kw)
    raise DataError(
        f"cannot read {path}: unknown extension {suffix or '(none)'!r}; expected one of "
        ".jsonl, .json, .parquet, .arrayrecord, .array_record"
    )


# --- multi-hop adapters (shared MuSiQue / HotpotQA training files) -------------------------------

DOC_TEMPLATE = "{title}\n{text}"


def format_doc(title: str, text: str, template: str = DOC_TEMPLATE) -> str:
    """Candidate text = title line + passage: the title often carries the entity a hop needs."""
    return template.format(title=title.strip(), text=text.strip())


def _adapter_error(
    source: str, index: int, field: str, expected: str, value: Any, reason: str
) -> RecordError:
    got = "nothing (field missing)" if value is None else short_repr(value)
    return RecordError(
        source=source, line=index + 1, index=index, field=field, expected=expected, got=got, reason=reason
    )


def _musique_dict(obj: Any, source: str, index: int, template: str) -> dict:
    """MuSiQue `{question, answer, answer_aliases, paragraphs: [{title, paragraph_text, is_supporting}]}`."""
    if not isinstance(obj, dict):
        return obj  # parse_record reports "not an object"
    paragraphs = obj.get("paragraphs")
    expected = "a list of {title, paragraph_text, is_supporting} objects"
    if not isinstance(paragraphs, list):
        raise _adapter_error(source, index, "paragraphs", expected, paragraphs, "wrong type")
    docs, pos = [], []
    for i, p in enumerate(paragraphs):
        if not (
            isinstance(p, dict)
            and isinstance(p.get("title"), str)
            and isinstance(p.get("paragraph_text"), str)
            and isinstance(p.get("is_supporting"), bool)
        ):
            raise _adapter_error(source, index, "paragraphs", expected + f" (at index {i})", p, "wrong type")
        docs.append(
            format_doc(p["title"], p["paragraph_text"], template) if p["paragraph_text"].strip() else ""
        )
        if p["is_supporting"]:
            pos.append(i)
    aliases = obj.get("answer_aliases") or []
    if not isinstance(aliases, list):
        raise _adapter_error(source, index, "answer_aliases", "a list of strings", aliases, "wrong type")
    answer = obj.get("answer")
    golden = [answer, *aliases] if isinstance(answer, str) else aliases
    return {
        "question": obj.get("question"),
        "answer": answer,
        "golden_answers": golden,
        "docs": docs,
        "pos_index": pos,
    }


def _hotpotqa_dict(obj: Any, source: str, index: int, template: str) -> dict:
    """HotpotQA distractor `{question, answer, context: [[title, [sentences]]], supporting_facts}`."""
    if not isinstance(obj, dict):
        return obj
    context = obj.get("context")
    expected = "a list of [title, [sentences]] pairs"
    if not isinstance(context, list):
        raise _adapter_error(source, index, "context", expected, context, "wrong type")
    docs, titles = [], []
    for i, c in enumerate(context):
        ok = (
            isinstance(c, list)
            and len(c) == 2
            and isinstance(c[0], str)
            and isinstance(c[1], list)
            and all(isinstance(s, str) for s in c[1])
        )
        if not ok:
            raise _adapter_error(source, index, "context", expected + f" (at index {i})", c, "wrong type")
        text = "".join(c[1])  # HotpotQA sentences carry their own leading spaces
        docs.append(format_doc(c[0], text, template) if text.strip() else "")
        titles.append(c[0])
    facts = obj.get("supporting_facts")
    if not (
        isinstance(facts, list) and all(isinstance(f, list) and f and isinstance(f[0], str) for f in facts)
    ):
        raise _adapter_error(
            source, index, "supporting_facts", "a list of [title, sentence_id]", facts, "wrong type"
        )
    gold_titles = {f[0] for f in facts}
    missing = sorted(gold_titles - set(titles))
    if missing:
        raise _adapter_error(
            source, index, "supporting_facts", "titles present in 'context'", missing, "title not in context"
        )
    pos = [i for i, t in enumerate(titles) if t in gold_titles]
    return {"question": obj.get("question"), "answer": obj.get("answer"), "docs": docs, "pos_index": pos}


def _multihop(
    path: PathLike,
    to_dict: Callable[[Any, str, int, str], dict],
    *,
    policy: str,
    min_docs: int | None,
    template: str,
    keep: Callable[[Any], bool] = lambda obj: True,
    drop_reason: str = "",
) -> tuple[list[Record], ReadReport]:
    _check_args(policy, "stage3")
    source = str(path)
    report = ReadReport(source=source)
    items = []
    for i, obj in enumerate(_load_json_array(path)):
        if keep(obj):
            items.append((i + 1, i, obj))
        else:  # a filter, not an error: counted and never raised
            report.read += 1
            report.skipped[drop_reason] = report.skipped.get(drop_reason, 0) + 1

    def convert(obj: Any, line: int | None, index: int | None) -> dict:
        return to_dict(obj, source, index, template)

    records = _validated(items, "stage3", report, policy, source=source, min_docs=min_docs, convert=convert)
    return list(records), report


def musique_to_retrieval(
    path: PathLike,
    *,
    policy: str = "error",
    min_docs: int | None = None,
    template: str = DOC_TEMPLATE,
    include_unanswerable: bool = False,
) -> tuple[list[Record], ReadReport]:
    """MuSiQue JSON array -> stage-3 `RetrievalRecord`s.

    docs = the question's paragraphs in file order, each `"title\\ntext"`; pos_index = positions of
    `is_supporting` paragraphs; answers = `answer` then `answer_aliases`. Unanswerable questions
    (MuSiQue-Full) have no usable gold: they are counted under `answerable: false`, not raised.
    """

    def keep(obj: Any) -> bool:
        return include_unanswerable or not isinstance(obj, dict) or obj.get("answerable", True) is not False

    return _multihop(
        path,
        _musique_dict,
        policy=policy,
        min_docs=min_docs,
        template=template,
        keep=keep,
        drop_reason="answerable: false",
    )


def hotpotqa_to_retrieval(
    path: PathLike,
    *,
    policy: str = "error",
    min_docs: int | None = None,
    template: str = DOC_TEMPLATE,
) -> tuple[list[Record], ReadReport]:
    """HotpotQA distractor JSON array -> stage-3 `RetrievalRecord`s.

    docs = the `context` passages in file order, each `"title\\n" + "".join(sentences)`;
    pos_index = positions of the passages whose title appears in `supporting_facts`.
    """
    return _multihop(path, _hotpotqa_dict, policy=policy, min_docs=min_docs, template=template)
