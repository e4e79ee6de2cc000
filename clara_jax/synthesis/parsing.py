"""Tolerant reading of LLM replies: every parser returns a `Parsed` value or a typed `ParseFailure`.

Why tolerant: real models wrap JSON in prose or code fences, stop mid-object when they run out of
tokens, repeat keys (`"Question1"` twice), rename keys (`"question 1"`, `"Q1"`, `"questions": [...]`)
and answer "CORRECT." instead of `{"Judgment": "Correct"}`. Each repair that was needed is named in
`Parsed.repairs`, so the synthesis report can say how often the model's output had to be fixed; a reply
that cannot be read yields a `ParseFailure` whose `reason` is counted, never an exception.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

# Replies longer than this are not parsed (a ParseFailure "reply_too_long"): the longest step asks for
# 768 tokens, a few thousand characters, so a longer reply is a model looping, and parsing stays cheap.
MAX_REPLY_CHARS = 32_000
# At most this many truncation repairs are tried per JSON value (each decodes the text once).
MAX_TRUNCATION_TRIES = 16
# Replies nest two or three levels; a value nested deeper is not what any prompt asked for.
MAX_JSON_DEPTH = 32
# Keys longer than this are not matched against the key patterns (no real key is that long).
MAX_KEY_CHARS = 64
# The one sentence the answering prompt tells the model to use when the passage lacks the answer.
REFUSAL = "The document does not contain this information."
# Looser phrasings of the same refusal that small models produce instead of the exact sentence.
_REFUSAL_PATTERNS = re.compile(
    r"(does not|doesn't|do not) (contain|provide|mention|say|include|specify|state)|"
    r"not (mentioned|provided|stated|specified|given|available) in the (document|passage|text)|"
    r"\b(cannot|can't|can not) be (determined|answered|found)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Parsed:
    value: Any
    repairs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParseFailure:
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Refusal:
    """The answerer said the document does not contain the answer (a valid reply, not a failure)."""

    text: str


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, so duplicate keys survive decoding."""


@dataclass
class _Json:
    value: Any
    repairs: list[str] = field(default_factory=list)


def _unreadable(text: str) -> ParseFailure | None:
    """The failure of a reply no parser reads: empty, or longer than MAX_REPLY_CHARS."""
    if not text or not text.strip():
        return ParseFailure("empty_reply")
    if len(text) > MAX_REPLY_CHARS:
        return ParseFailure("reply_too_long", f"{len(text)} characters; the limit is {MAX_REPLY_CHARS}")
    return None


_BLANKS = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\s*\n\s*")


def _squeeze(text: str) -> str:
    """Runs of blanks -> one space, blank lines -> one newline. Every parser collapses whitespace in
    what it returns anyway; squeezing first keeps the line patterns (`\\s*` next to `\\s*`) linear
    on a reply of thousands of spaces."""
    return _BLANK_LINES.sub("\n", _BLANKS.sub(" ", text))


# ------------------------------------------------------------------------------------------ JSON

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.DOTALL)


def _strip_fences(text: str, repairs: list[str]) -> str:
    match = _FENCE.search(text)
    if match:
        repairs.append("code_fence")
        return match.group(1)
    return text


def _decode(candidate: str) -> Any:
    """The JSON value, or None: malformed, too deep for the decoder, or an integer too long to convert."""
    try:
        return json.loads(candidate, object_pairs_hook=_Pairs, strict=False)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


# Open brackets as a linked list, innermost first: (bracket, outer, depth) or None. A cut point keeps
# the node it was made at, so recording one costs nothing however deep the nesting is (no stack copy).
_Open = tuple[str, Any, int] | None
# What the scanner stops at: a whole string (its closing quote captured, if there is one) or a bracket
# or comma; everything in between is skipped by the regex engine.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(")?|[\[\]{},]', re.DOTALL)
_OPENER = {"}": "{", "]": "["}


def _scan(text: str) -> tuple[int | None, list[tuple[int, _Open]], _Open, bool]:
    """Walk a JSON-ish text from its first bracket: (end of the balanced value or None, cut points
    after complete items with the brackets open there, the brackets still open, inside a string).
    A value nested deeper than MAX_JSON_DEPTH is abandoned: (None, [], None, False)."""
    open_: _Open = None
    cuts: list[tuple[int, _Open]] = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token[0] == '"':
            if match.group(1) is None:  # no closing quote: the text ends inside this string
                return None, cuts, open_, True
        elif token in "{[":
            depth = 1 if open_ is None else open_[2] + 1
            if depth > MAX_JSON_DEPTH:
                return None, [], None, False
            open_ = (token, open_, depth)
        elif token in "}]":
            if open_ is None or _OPENER[token] != open_[0]:
                return None, cuts, open_, False
            open_ = open_[1]
            if open_ is None:
                return match.end(), cuts, None, False
            cuts.append((match.end(), open_))
        elif open_ is not None:  # a comma inside the value
            cuts.append((match.start(), open_))
    return None, cuts, open_, False


def _closers(open_: _Open) -> str:
    closers = []
    while open_ is not None:
        closers.append("}" if open_[0] == "{" else "]")
        open_ = open_[1]
    return "".join(closers)


_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _load_at(text: str, start: int) -> _Json | None:
    """Decode the JSON value starting at `start`; repair trailing commas, single quotes and truncation
    (keeping only the items that were complete)."""
    body = text[start:]
    end, cuts, open_, in_string = _scan(body)
    if end is not None:
        candidate = body[:end]
        for attempt, repair in ((candidate, None), (_TRAILING_COMMA.sub(r"\1", candidate), "trailing_comma")):
            value = _decode(attempt)
            if value is not None:
                return _Json(value, [repair] if repair else [])
        value = _python_literal(candidate)
        return None if value is None else _Json(value, ["python_literal"])
    if open_ is None:
        return None
    # Truncated: first try closing what is open (the last item may be complete), then cut back to
    # the end of each earlier complete item (the latest few: each try decodes the text once).
    tries = [] if in_string else [(len(body), open_)]
    tries += cuts[::-1]
    for pos, open_there in tries[:MAX_TRUNCATION_TRIES]:
        candidate = _TRAILING_COMMA.sub(r"\1", body[:pos].rstrip().rstrip(",") + _closers(open_there))
        value = _decode(candidate)
        if value is not None:
            return _Json(value, ["truncated_json"])
    return None


def _python_literal(candidate: str) -> Any:
    """A Python-literal dict or list ({'Question1': '...'}) as pairs, or None. Duplicate keys are lost;
    `{[1]: 2}` (TypeError), deep nesting and huge numbers are just not literals we can read."""
    try:
        value = ast.literal_eval(candidate)
        return _to_pairs(value) if isinstance(value, dict | list) else None
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _to_pairs(value: Any) -> Any:
    if isinstance(value, dict):
        return _Pairs((str(k), _to_pairs(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_to_pairs(v) for v in value]
    return value


def find_json(text: str) -> _Json | None:
    """The first decodable JSON object or array in a reply (fenced, inside prose, or truncated)."""
    repairs: list[str] = []
    body = _strip_fences(text[:MAX_REPLY_CHARS], repairs)
    starts = [m.start() for _, m in zip(range(20), re.finditer(r"[{\[]", body))]
    for start in starts:
        found = _load_at(body, start)
        if found is None:
            continue
        if (
            body[:start].strip()
            or "truncated_json" not in found.repairs
            and body[start:].strip()[-1:] not in "}]"
        ):
            found.repairs.append("prose_around_json")
        found.repairs[:0] = repairs
        return found
    return None


# ------------------------------------------------------------------------------------- questions

_QUESTION_KEY = re.compile(
    r"^\s*(?:(?:sub|supplementary|new|complex|simple)[\s_-]*)?(?:q|question)s?[\s_#.-]*\d*\s*$", re.I
)
_CANONICAL_KEY = re.compile(r"^Question\d+$")
_NUMBER_KEY = re.compile(r"number|count|^n$|how many|num_", re.I)
_LINE_ITEM = re.compile(
    r"^\s*(?:[-*•]\s*)?(?:\*\*)?(?:(?:q|question)\s*\d+\s*(?:\*\*)?\s*[:.)\-]|\d+\s*[.):\-])\s*(?:\*\*)?\s*(.+?)\s*$",
    re.I,
)
_WORD = re.compile(r"[A-Za-z]{2,}")


def _is_question_key(key: str) -> bool:
    return len(key) <= MAX_KEY_CHARS and bool(_QUESTION_KEY.match(key))


def clean_text(text: str) -> str:
    """Collapse whitespace and drop wrapping quotes / markdown emphasis."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r"^\*\*|\*\*$", "", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def normalise(text: str) -> str:
    """Lower-case alphanumerics only: the key under which near-identical questions are duplicates."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _plausible_question(text: str) -> bool:
    return len(_WORD.findall(text)) >= 3


def _questions_from(value: Any, repairs: list[str], skip_number: bool) -> list[str]:
    """Questions in a decoded JSON value: canonical or variant keys, lists, nested objects."""
    found: list[str] = []
    if isinstance(value, _Pairs):
        keys = [k for k, _ in value]
        if len(set(keys)) < len(keys):
            repairs.append("duplicate_keys")
        for key, item in value:
            if skip_number and len(key) <= MAX_KEY_CHARS and _NUMBER_KEY.search(key):
                continue
            if _is_question_key(key):
                if not _CANONICAL_KEY.match(key):
                    repairs.append("key_variant")
                found += _questions_from(item, repairs, skip_number)
            elif isinstance(item, str) and item.strip().endswith("?"):
                repairs.append("key_variant")  # an unknown key whose value is plainly a question
                found.append(item)
            elif isinstance(item, list | _Pairs):
                found += _questions_from(item, repairs, skip_number)
    elif isinstance(value, list):
        for item in value:
            found += _questions_from(item, repairs, skip_number)
    elif isinstance(value, str):
        found.append(value)
    return found


def _questions_from_lines(text: str) -> list[str]:
    items = [m.group(1) for m in map(_LINE_ITEM.match, text.splitlines()) if m]
    if not items:  # last resort: any line that is a question
        items = [line for line in text.splitlines() if line.strip().endswith("?")]
    return items


def _dedupe(questions: list[str], limit: int) -> tuple[list[str], bool]:
    seen, kept = set(), []
    for q in questions:
        q = clean_text(q)
        key = normalise(q)
        if not _plausible_question(q) or key in seen:
            continue
        seen.add(key)
        kept.append(q)
    return kept[:limit], len(kept) > limit


def parse_questions(text: str, *, limit: int = 40) -> Parsed | ParseFailure:
    """`{"Question1": ..., "QuestionN": ...}` and its real-world variants -> a list of questions."""
    if unreadable := _unreadable(text):
        return unreadable
    text = _squeeze(text)
    repairs: list[str] = []
    found = find_json(text)
    questions: list[str] = []
    if found is not None:
        repairs += found.repairs
        questions = _questions_from(found.value, repairs, skip_number=True)
    if not questions:
        questions = _questions_from_lines(text)
        if questions:
            repairs.append("line_format")
    questions, capped = _dedupe(questions, limit)
    if not questions:
        return ParseFailure("no_questions", text[:200])
    if capped:
        repairs.append("capped")
    return Parsed(questions, tuple(dict.fromkeys(repairs)))


# ---------------------------------------------------------------------------------------- answers

_ANSWER_PREFIX = re.compile(r"(?:^|\n)\s*[*_#]*\s*(?:final\s+)?answer\s*[*_]*\s*[:：]\s*[*_]*", re.I)


def is_refusal(text: str) -> bool:
    norm = normalise(text)
    return norm.startswith(normalise(REFUSAL)) or bool(_REFUSAL_PATTERNS.search(text))


def parse_answer(text: str, *, max_words: int = 80) -> Parsed | ParseFailure:
    """`Answer: ...` (or `{"Answer": ...}`, or a bare short reply) -> the answer, or a `Refusal`."""
    if unreadable := _unreadable(text):
        return unreadable
    text = _squeeze(text)
    repairs: list[str] = []
    answer = None
    match = _ANSWER_PREFIX.search(text)
    if match:
        rest = text[match.end() :].strip()
        lines = [line for line in rest.splitlines() if line.strip()]
        answer = lines[0] if lines else ""
        if text[: match.start()].strip():
            repairs.append("prose_around_answer")
    else:
        found = find_json(text)
        if found is not None and isinstance(found.value, _Pairs):
            values = [v for k, v in found.value if "answer" in k.lower() and isinstance(v, str)]
            if values:
                answer, repairs = values[0], [*found.repairs, "json_answer"]
        if answer is None:
            body = _strip_fences(text, repairs)
            lines = [line for line in body.splitlines() if line.strip()]
            if len(lines) == 1:
                answer = lines[0]
                repairs.append("no_answer_prefix")
    if answer is None:
        return ParseFailure("no_answer_line", text[:200])
    answer = clean_text(answer)
    if not answer:
        return ParseFailure("empty_answer")
    if is_refusal(answer):
        return Parsed(Refusal(answer), tuple(repairs))
    if len(answer.split()) > max_words:
        return ParseFailure("answer_too_long", answer[:200])
    return Parsed(answer, tuple(repairs))


# ---------------------------------------------------------------------------------------- verdicts

_POSITIVE = ("correct", "yes", "true", "valid", "right", "accurate", "pass")
_NEGATIVE = ("incorrect", "not correct", "no", "false", "invalid", "wrong", "inaccurate", "fail")
_VERDICT = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _POSITIVE + _NEGATIVE), key=len, reverse=True)) + r")\b", re.I
)
_VERDICT_KEY = re.compile(r"judg|verdict|result|decision|answer|label|correct|valid", re.I)


def _verdict_word(text: str) -> bool | None:
    match = _VERDICT.search(text)
    if not match:
        return None
    return match.group(1).lower() in _POSITIVE


def parse_verdict(text: str) -> Parsed | ParseFailure:
    """`{"Judgment": "Correct"}`, `CORRECT.`, `Yes`, `No, because ...` -> True / False.

    A JSON verdict wins; in free text the reply must start with a verdict word, or use words of
    one polarity only (a reply mentioning both "correct" and "incorrect" is ambiguous)."""
    if unreadable := _unreadable(text):
        return unreadable
    text = _squeeze(text)
    found = find_json(text)
    if found is not None and isinstance(found.value, _Pairs):
        for key, value in found.value:
            if len(key) <= MAX_KEY_CHARS and _VERDICT_KEY.search(key):
                if isinstance(value, bool):
                    return Parsed(value, tuple(found.repairs))
                if isinstance(value, str) and (verdict := _verdict_word(value)) is not None:
                    repairs = found.repairs + ([] if key == "Judgment" else ["key_variant"])
                    return Parsed(verdict, tuple(dict.fromkeys(repairs)))
    stripped = re.sub(r"^[\s*_#>\"'`]*(?:judg(?:e)?ment|verdict)?\s*[:：]?\s*[*_\"'`]*", "", text, flags=re.I)
    first = _VERDICT.match(stripped)
    if first:
        return Parsed(first.group(1).lower() in _POSITIVE, ("free_text_verdict",))
    words = {m.group(1).lower() in _POSITIVE for m in _VERDICT.finditer(text)}
    if len(words) == 1:
        return Parsed(words.pop(), ("free_text_verdict",))
    return ParseFailure("ambiguous_verdict" if words else "no_verdict", text[:200])


# --------------------------------------------------------------------------------------- coverage

_NUMBER_LINE = re.compile(r"number of supplementary questions\W*(\d+)", re.I)


def parse_coverage(text: str, *, limit: int = 40) -> Parsed | ParseFailure:
    """`{"Number of Supplementary Questions": N, "Question1": ...}` -> (N, questions).

    N = 0 means the existing pairs cover the passage (questions listed anyway are ignored); a missing
    N with questions present is read as N = len(questions); N > 0 without questions is a failure."""
    if unreadable := _unreadable(text):
        return unreadable
    text = _squeeze(text)
    repairs: list[str] = []
    number = None
    questions: list[str] = []
    found = find_json(text)
    if found is not None:
        repairs += found.repairs
        if isinstance(found.value, _Pairs):
            for key, value in found.value:
                if len(key) <= MAX_KEY_CHARS and _NUMBER_KEY.search(key) and not _is_question_key(key):
                    try:
                        number = int(str(value).strip())
                    except ValueError:
                        pass
                    if key != "Number of Supplementary Questions":
                        repairs.append("key_variant")
        questions = _questions_from(found.value, repairs, skip_number=True)
    if number is None and (match := _NUMBER_LINE.search(text)):
        number = int(match.group(1))
        repairs.append("line_format")
    if not questions and found is None:
        questions = _questions_from_lines(text)
    questions, capped = _dedupe(questions, limit)
    if number == 0:
        if questions:
            repairs.append("ignored_questions")
        return Parsed((0, []), tuple(dict.fromkeys(repairs)))
    if not questions:
        reason = "missing_questions" if number else "no_coverage_verdict"
        return ParseFailure(reason, text[:200])
    if number is None:
        repairs.append("missing_number")
    elif number != len(questions):
        repairs.append("number_mismatch")
    if capped:
        repairs.append("capped")
    return Parsed((len(questions), questions), tuple(dict.fromkeys(repairs)))


# ------------------------------------------------------------------------------------- paraphrase

_LEAD_IN = re.compile(
    r"^\s*(?:[*_#]*\s*(?:rewritten|paraphrased?)(?:\s+(?:text|passage|version|document))?\s*[*_]*\s*[:：]\s*[*_]*|"
    r"(?:sure|certainly|okay|ok)?[!,.]?\s*here(?:'s| is)[^\n:]{0,80}:\s*)",
    re.I,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])")


def _sentences(text: str) -> list[str]:
    """The pieces of `text` that end in . ! or ?: a split, linear in the text (a search for
    `[^.!?]+[.!?]` rescans the unterminated tail from every position: 20 s on 30 KB without a full
    stop, as in Chinese or Japanese text)."""
    return [piece for piece in _SENTENCE_END.split(text) if piece[-1:] in (".", "!", "?")]


def copied_sentence(source: str, paraphrase: str, min_words: int = 8) -> str | None:
    """The first sentence of `source` (at least `min_words` words) repeated verbatim, or None."""
    target = normalise(paraphrase)
    for sentence in _sentences(source):
        norm = normalise(sentence)
        if len(norm.split()) >= min_words and norm in target:
            return sentence.strip()
    return None


def parse_paraphrase(text: str, source: str, *, finish_reason: str = "stop") -> Parsed | ParseFailure:
    """The rewritten passage without lead-ins, fences or quotes; refuses truncated or copied text."""
    if finish_reason == "length":
        return ParseFailure("truncated")
    if unreadable := _unreadable(text):
        return unreadable
    text = _squeeze(text)
    repairs: list[str] = []
    body = _strip_fences(text, repairs)
    lead = _LEAD_IN.match(body)
    if lead:
        body = body[lead.end() :]
        repairs.append("lead_in")
    body = clean_text(body)
    if len(_WORD.findall(body)) < 5:
        return ParseFailure("too_short", body[:200])
    if normalise(body) == normalise(source):
        return ParseFailure("copied_sentence", "the whole passage")
    copied = copied_sentence(source, body)
    if copied:
        return ParseFailure("copied_sentence", copied[:200])
    return Parsed(body, tuple(repairs))
