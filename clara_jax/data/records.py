"""Normalised training/evaluation records, and the validation that turns a raw dict into one.

The official loader (`preprocess_data`, docs/official_code.md §4) guesses field names and fails late: a stage-3
record with only `gold_answer` crashes deep in the pipeline (§4.3), and a QA record whose
questions and answers differ in length is silently truncated by `zip`. Here every record is checked
once, up front, and a bad one yields a `RecordError` that names the file, the line, the field, what
was expected and what was found, so a bad line in a 2M-record corpus is a one-line fix.

Stages and the record each yields:

| stage    | record              | source format                                              |
|----------|---------------------|------------------------------------------------------------|
| `stage1` | `CompressionRecord` | `{data_type, question: [..], answers: [..], docs: [doc]}`  |
| `stage2` | `InstructionRecord` | `{question, docs: [..], answer}`                           |
| `stage3` | `RetrievalRecord`   | `{question, answer, docs: [N candidates], pos_index}`      |
| `eval`   | `RetrievalRecord`   | `{question, golden_answers: [..], docs, pos_index?}`       |

Field resolution (documented order, first present wins; a JSON `null` counts as absent, because
HF `datasets` fills a column missing from some rows with null):
- documents: `docs`, then `context`, then `content` (the official order);
- stage-2 / stage-3 target: `answer`, then `gold_answer`, then `golden_answers[0]` (accepting
  `gold_answer` fixes the crash of docs/official_code.md §4.3);
- eval gold: `golden_answers[0]`, then `gold_answer`, then `answer` (the official evaluate.py reads
  `golden_answers[0]` else `answer`; `gold_answer` goes before `answer` because in the stage-2 format
  `answer` is a teacher's prediction, not a gold);
- `RetrievalRecord.answers` holds every gold (target first, then `golden_answers`, then `gold_answer`,
  deduplicated) so metrics can take the max over aliases, which the official code does not (it
  uses only the first gold answer, docs/official_code.md §5).

A present field of the wrong type is an error, never a reason to fall back to the next name: a
stage-3 `answer` that is a list means the file is not what the caller thinks it is.
Documents longer than the model's limit are not errors here: tokenization truncates and counts them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Record layouts, named after the stage that reads them (model/stage_registry.py: Stage.record_kind),
# plus the evaluation layout (a stage-3 record whose answers are all golds).
RECORD_KINDS = ("stage1", "stage2", "stage3", "eval")
DOC_FIELDS = ("docs", "context", "content")


@dataclass(frozen=True)
class CompressionRecord:
    """Stage 1 (SCP): one passage with its QA pairs, or with its paraphrase (questions empty)."""

    kind: str  # "qa" | "paraphrase"
    doc: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]


@dataclass(frozen=True)
class InstructionRecord:
    """Stage 2: a question, its retrieved docs in the given order, and the (teacher) target answer."""

    question: str
    docs: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class RetrievalRecord:
    """Stage 3 and evaluation: a question, its candidate pool and the gold positions in it.

    `answer` is the target (= `answers[0]`); `answers` holds every gold alias. `pos_index` may be
    empty (`no_pos` evaluation files, or stage-3 data without labels).
    """

    question: str
    answer: str
    answers: tuple[str, ...]
    docs: tuple[str, ...]
    pos_index: tuple[int, ...]


Record = CompressionRecord | InstructionRecord | RetrievalRecord


class DataError(ValueError):
    """A data file that cannot be used as given (unreadable, of an unknown kind, or with too few usable
    records); the message names the file and says what was expected. Command-line tools turn it into
    exit status 2 with the message, never a traceback."""


class RecordError(DataError):
    """A record that cannot be used, located precisely enough to fix it by hand.

    `source` is the file (or label); `line` is the 1-based position of the record in it (the JSONL
    line, or `index + 1` for JSON arrays, dataset rows and ArrayRecord entries); `index` is the
    0-based element index for those random-access sources (None for JSONL), which the message shows
    as `record N` so that `data[N]` finds it. `field` is None for whole-record problems (malformed
    JSON, not an object). `reason` is the short key a skip is counted under in a `ReadReport`.
    """

    def __init__(
        self,
        *,
        source: str,
        line: int | None,
        field: str | None,
        expected: str,
        got: str,
        reason: str,
        index: int | None = None,
    ):
        self.source = source
        self.line = index + 1 if line is None and index is not None else line
        self.index = index
        self.field = field
        self.expected = expected
        self.got = got
        self.reason = f"{field or 'record'}: {reason}"
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{location(source, line, index)}: {what}expected {expected}, got {got}")


def location(source: str, line: int | None, index: int | None = None) -> str:
    """`path:17` for a line, `path: record 16` for an element index, `path` otherwise."""
    if index is not None:
        return f"{source}: record {index}"
    if line is not None:
        return f"{source}:{line}"
    return source


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "bool", int: "int", float: "float"}.get(
        type(value), type(value).__name__
    )


class _Checker:
    """Raises located `RecordError`s for one record (keeps the location out of every call)."""

    def __init__(self, obj: dict, where: str, line: int | None, index: int | None):
        self.obj = obj
        self.where = where
        self.line = line
        self.index = index

    def fail(self, field: str | None, expected: str, got: str, reason: str) -> RecordError:
        return RecordError(
            source=self.where,
            line=self.line,
            index=self.index,
            field=field,
            expected=expected,
            got=got,
            reason=reason,
        )

    def get(self, name: str) -> Any:
        return self.obj.get(name)

    def string(self, name: str) -> str:
        value = self.obj.get(name)
        if value is None:
            raise self.fail(name, "a non-empty string", "nothing (field missing)", "missing")
        if not isinstance(value, str):
            raise self.fail(
                name, "a non-empty string", f"{_type_name(value)} {short_repr(value)}", "wrong type"
            )
        if not value.strip():
            raise self.fail(name, "a non-empty string", short_repr(value), "empty")
        return value

    def strings(
        self, name: str, value: Any, *, what: str = "strings", allow_empty_list: bool = False
    ) -> tuple:
        """A list of non-empty strings, or a located error naming the offending element."""
        expected = f"a list of non-empty {what}"
        if value is None:
            raise self.fail(name, expected, "nothing (field missing)", "missing")
        if not isinstance(value, list):
            raise self.fail(name, expected, f"{_type_name(value)} {short_repr(value)}", "wrong type")
        if not value and not allow_empty_list:
            raise self.fail(name, expected, "an empty list", "empty")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                got = f"{_type_name(item)} {short_repr(item)} at index {i}"
                raise self.fail(name, expected, got, "wrong type")
            if not item.strip():
                raise self.fail(name, expected, f"{short_repr(item)} at index {i}", "empty")
        return tuple(value)

    def docs(self) -> tuple[str, ...]:
        for name in DOC_FIELDS:
            value = self.obj.get(name)
            if value is not None:
                return self.strings(name, value, what="document strings")
        raise self.fail(
            "docs",
            "a list of document strings (in 'docs', 'context' or 'content')",
            "none of them",
            "missing",
        )


def parse_record(
    obj: Any,
    stage: str,
    *,
    where: str = "<record>",
    line: int | None = None,
    index: int | None = None,
    min_docs: int | None = None,
    docs_per_example: int | None = None,
) -> Record:
    """Validate one raw record and return its normalised form, or raise a located `RecordError`.

    `min_docs` (stages 2, 3, eval): reject records with fewer candidates (e.g. fewer than top-k).
    `docs_per_example` (stages 2, 3, eval): require exactly this many docs (stage 2 batches stack
    a fixed number of compressed docs per question). Stage 1 always requires exactly one doc.
    """
    if stage not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {stage!r}; expected one of {RECORD_KINDS}")
    check = _Checker(obj if isinstance(obj, dict) else {}, where, line, index)
    if not isinstance(obj, dict):
        raise check.fail(None, "a JSON object", f"{_type_name(obj)} {short_repr(obj)}", "not an object")
    if stage == "stage1":
        return _compression(check)
    docs = check.docs()
    if min_docs is not None and len(docs) < min_docs:
        raise check.fail("docs", f"at least {min_docs} documents", f"{len(docs)}", "too few")
    if docs_per_example is not None and len(docs) != docs_per_example:
        raise check.fail("docs", f"exactly {docs_per_example} documents", f"{len(docs)}", "wrong count")
    question = check.string("question")
    if stage == "stage2":
        return InstructionRecord(question=question, docs=docs, answer=_target(check))
    answers = _eval_golds(check) if stage == "eval" else _stage3_golds(check)
    return RetrievalRecord(
        question=question,
        answer=answers[0],
        answers=answers,
        docs=docs,
        pos_index=_pos_index(check, len(docs)),
    )


def _compression(check: _Checker) -> CompressionRecord:
    data_type = check.get("data_type")
    if data_type is not None and not isinstance(data_type, str):
        raise check.fail(
            "data_type", "a string", f"{_type_name(data_type)} {short_repr(data_type)}", "wrong type"
        )
    docs = check.docs()
    if len(docs) != 1:
        raise check.fail(
            "docs", "exactly 1 document (stage 1 compresses one passage)", f"{len(docs)}", "wrong count"
        )
    answers = check.strings("answers", check.get("answers"))
    if data_type == "paraphrase":
        if len(answers) != 1:
            raise check.fail("answers", "exactly 1 paraphrase", f"{len(answers)}", "wrong count")
        return CompressionRecord(kind="paraphrase", doc=docs[0], questions=(), answers=answers)
    # Every other data_type ("qa", "simple_qa", "complex_qa", ...) takes the QA path (docs/official_code.md §4.1).
    questions = check.strings("question", check.get("question"))
    if len(questions) != len(answers):
        got = f"{len(questions)} questions and {len(answers)} answers"
        raise check.fail("answers", "one answer per question", got, "length mismatch")
    return CompressionRecord(kind="qa", doc=docs[0], questions=questions, answers=answers)


def _optional_golds(check: _Checker) -> tuple[tuple[str, ...], str | None]:
    golden = check.get("golden_answers")
    golden = () if golden is None else check.strings("golden_answers", golden)
    gold = check.get("gold_answer")
    return golden, (None if gold is None else check.string("gold_answer"))


def _target(check: _Checker) -> str:
    """Stage-2/3 target: `answer`, then `gold_answer`, then `golden_answers[0]`."""
    if check.get("answer") is not None:
        return check.string("answer")
    golden, gold = _optional_golds(check)
    if gold is not None:
        return gold
    if golden:
        return golden[0]
    raise check.fail(
        "answer",
        "a non-empty string in 'answer' (or fallback 'gold_answer', 'golden_answers')",
        "none of them",
        "missing",
    )


def _dedup(items: Sequence[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for item in items if item is not None))


def _stage3_golds(check: _Checker) -> tuple[str, ...]:
    target = _target(check)
    golden, gold = _optional_golds(check)
    return _dedup([target, *golden, gold])


def _eval_golds(check: _Checker) -> tuple[str, ...]:
    golden, gold = _optional_golds(check)
    answer = None if check.get("answer") is None else check.string("answer")
    if golden or gold is not None:
        return _dedup([*golden, gold])
    if answer is not None:
        return (answer,)
    raise check.fail(
        "golden_answers",
        "a list of gold strings in 'golden_answers' (or fallback 'gold_answer', 'answer')",
        "none of them",
        "missing",
    )


def _pos_index(check: _Checker, n_docs: int) -> tuple[int, ...]:
    value = check.get("pos_index")
    if value is None:
        return ()
    expected = f"a list of distinct ints in [0, {n_docs})"
    if not isinstance(value, list):
        raise check.fail("pos_index", expected, f"{_type_name(value)} {short_repr(value)}", "wrong type")
    # bool is an int subclass, and 3.0 is not an index: both are type errors.
    if any(type(i) is not int for i in value):
        raise check.fail("pos_index", expected, short_repr(value), "wrong type")
    if any(not 0 <= i < n_docs for i in value):
        raise check.fail("pos_index", expected, short_repr(value), "out of range")
    if len(set(value)) != len(value):
        raise check.fail("pos_index", expected, short_repr(value), "duplicate")
    return tuple(value)


def record_to_dict(record: Record) -> dict:
    """The official on-disk form of a record; `parse_record` of it gives the record back.

    A `RetrievalRecord` keeps its aliases in `golden_answers` (target first), so it reads back the
    same as `stage3` (target = `answer`) and as `eval` (target = `golden_answers[0]`).
    """
    if isinstance(record, CompressionRecord):
        if record.kind == "paraphrase":
            return {"data_type": "paraphrase", "answers": list(record.answers), "docs": [record.doc]}
        return {
            "data_type": record.kind,
            "question": list(record.questions),
            "answers": list(record.answers),
            "docs": [record.doc],
        }
    if isinstance(record, InstructionRecord):
        return {"question": record.question, "docs": list(record.docs), "answer": record.answer}
    if isinstance(record, RetrievalRecord):
        return {
            "question": record.question,
            "answer": record.answer,
            "golden_answers": list(record.answers),
            "docs": list(record.docs),
            "pos_index": list(record.pos_index),
        }
    raise TypeError(f"not a record: {type(record).__name__}")


def record_to_json(record: Record | dict) -> str:
    obj = record if isinstance(record, dict) else record_to_dict(record)
    return json.dumps(obj, ensure_ascii=False)


@dataclass
class ReadReport:
    """What a reader did with every record: `kept + sum(skipped.values()) == read`, always.

    `skipped` counts skips per reason (`"<field>: <short reason>"`); `messages` keeps the first
    `max_messages` full skip messages (all of them are also logged as warnings). Blank JSONL lines
    are not records: they are counted in `blank_lines`, not in `read`.
    """

    source: str
    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    blank_lines: int = 0
    max_messages: int = 20

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, err: RecordError) -> None:
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        if len(self.messages) < self.max_messages:
            self.messages.append(str(err))

    def summary(self) -> str:
        text = f"{self.source}: read {self.read}, kept {self.kept}, skipped {self.n_skipped}"
        if self.skipped:
            reasons = ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            text += f" ({reasons})"
        if self.blank_lines:
            text += f"; {self.blank_lines} blank lines"
        return text
