"""Standard JSON from untrusted files: every way a value can be hostile becomes one `JsonProblem`.

Python's `json` accepts more than standard JSON and fails in ways a reader does not expect:
`NaN` / `Infinity` are accepted, a repeated key silently keeps its last value, `"\\ud800"` decodes
to a lone surrogate that only fails later (when a tokenizer encodes it), an integer longer than
`sys.get_int_max_str_digits()` raises a bare `ValueError`, and deep nesting a `RecursionError`.
Here each of those is a `JsonProblem` (a `ValueError`) that says what was found, and, where the
text says it, at which character offset, so a caller can name the file and line.

Values that decode but are not allowed (non-standard constants, duplicate keys, oversized
integers) are marked while decoding and reported by `check`, so a JSON array can be decoded once
and each element accepted or rejected on its own.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

# Records are a few levels deep; anything deeper is hostile or not a record.
MAX_DEPTH = 64

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Tokens that change nesting depth, with strings skipped whole (escapes included).
_DEPTH_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


class JsonProblem(ValueError):
    """Text that is not acceptable JSON: `got` says what was found, `kind` is its short category (for
    counting skips); `pos` is the character offset in the text when known; `field` is the top-level
    key the problem is under, if any."""

    def __init__(self, got: str, kind: str, *, pos: int | None = None, field: str | None = None):
        super().__init__(got)
        self.got, self.kind, self.pos, self.field = got, kind, pos, field


class _Invalid:
    """A value standard JSON (or a record) does not allow, kept in place so decoding can go on."""

    __slots__ = ("what", "kind")

    def __init__(self, what: str, kind: str):
        self.what, self.kind = what, kind


class _Decoder(json.JSONDecoder):
    """Python's decoder with hooks that put an `_Invalid` where a value is not allowed, and count them."""

    def __init__(self):
        super().__init__(
            object_pairs_hook=self._object,
            parse_int=self._int,
            parse_float=self._float,
            parse_constant=self._constant,
        )
        self.marks = 0

    def _mark(self, what: str, kind: str) -> _Invalid:
        self.marks += 1
        return _Invalid(what, kind)

    def _constant(self, name: str) -> _Invalid:
        return self._mark(f"the non-standard JSON constant {name}", "non-standard number")

    def _int(self, digits: str) -> int | _Invalid:
        limit = sys.get_int_max_str_digits()
        n = len(digits.lstrip("-"))
        if limit and n > limit:
            return self._mark(f"an integer with {n} digits (the limit is {limit})", "integer too long")
        return int(digits)

    def _float(self, text: str) -> float | _Invalid:
        value = float(text)
        if not math.isfinite(value):
            return self._mark(f"the number {text[:40]} (too large for a float)", "non-standard number")
        return value

    def _object(self, pairs: list[tuple[str, Any]]) -> dict | _Invalid:
        value = dict(pairs)
        if len(value) != len(pairs):
            seen: set[str] = set()
            duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
            return self._mark(f"the duplicate key {_show(duplicate)}", "duplicate key")
        return value


def _show(text: str, limit: int = 40) -> str:
    """A repr that is safe to print (lone surrogates escaped) and short."""
    shown = ascii(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _around(text: str, pos: int, context: int = 12) -> str:
    """The characters around `pos`, printable (`'...the \\ud800 bridge...'`), to find it by eye."""
    start, end = max(0, pos - context), pos + context + 1
    return ("..." if start else "") + ascii(text[start:end]) + ("..." if end < len(text) else "")


def decode_utf8(data: bytes) -> str:
    """UTF-8 bytes (an optional byte-order mark dropped) as text, or a `JsonProblem` at the bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        got = f"invalid UTF-8 (byte 0x{bad} at byte offset {exc.start})"
        raise JsonProblem(got, "invalid UTF-8", pos=exc.start) from None


def loads(text: str) -> Any:
    """Decode one JSON value; values that are not allowed come back marked, for `check` to report.

    Raises `JsonProblem` for malformed JSON and for nesting the decoder cannot follow."""
    return _decode(text)[0]


def _decode(text: str) -> tuple[Any, int]:
    """(the value, how many values in it were marked as not allowed)."""
    decoder = _Decoder()
    try:
        return decoder.decode(text), decoder.marks
    except json.JSONDecodeError as exc:
        got = f"malformed JSON ({exc.msg} at column {exc.colno})"
        raise JsonProblem(got, "malformed JSON", pos=exc.pos) from None
    except RecursionError:
        raise JsonProblem(_TOO_DEEP, "too deep", pos=_too_deep_at(text)) from None


def _too_deep_at(text: str) -> int | None:
    """Offset of the first bracket nested deeper than MAX_DEPTH (only computed on the error path)."""
    depth = 0
    for match in _DEPTH_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return match.start()
        elif token in "]}":
            depth -= 1
    return None


def check(value: Any) -> Any:
    """`value` if it holds only standard JSON within MAX_DEPTH; else raises a `JsonProblem` naming the
    first thing that is not (a marked value, or a string with a lone UTF-16 surrogate) and where."""
    # (item, path to it, depth, the top-level key it is under)
    stack: list[tuple[Any, str, int, str | None]] = [(value, "", 0, None)]
    while stack:
        item, path, depth, top = stack.pop()
        where = _at(path, top)
        if depth > MAX_DEPTH:
            raise JsonProblem(_TOO_DEEP + where, "too deep", field=top)
        if isinstance(item, _Invalid):
            raise JsonProblem(item.what + where, item.kind, field=top)
        if isinstance(item, str):
            if match := _LONE_SURROGATE.search(item):
                got = f"{_SURROGATE} in the string {_around(item, match.start())}{where}"
                raise JsonProblem(got, "lone surrogate", field=top)
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if match := _LONE_SURROGATE.search(key):
                    got = f"{_SURROGATE} in the key {_around(key, match.start())}{where}"
                    raise JsonProblem(got, "lone surrogate", field=top)
                child_top = key if depth == 0 else top
                stack.append((child, f"{path}.{key}" if path else key, depth + 1, child_top))
        elif isinstance(item, list):
            for i in reversed(range(len(item))):
                stack.append((item[i], f"{path}[{i}]", depth + 1, top))
    return value


_SURROGATE = "a lone UTF-16 surrogate (not valid Unicode)"
_TOO_DEEP = f"JSON nested deeper than {MAX_DEPTH} levels"


def _at(path: str, top: str | None) -> str:
    """` at docs[2]` (nothing when the path is just the top-level field the error already names)."""
    if not path or path == top:
        return ""
    shown = ascii(path)[1:-1]
    return f" at {shown if len(shown) <= 80 else shown[:77] + '...'}"


def loads_checked(text: str) -> Any:
    """`check(loads(text))`: one JSON value that is standard JSON throughout, or a `JsonProblem`.

    The walk of `check` is skipped when the text shows it cannot find anything: nothing was marked,
    no `\\uD800`-`\\uDFFF` escape (raw UTF-8 cannot hold a surrogate) and too few brackets to nest
    past MAX_DEPTH. That keeps ordinary records at the cost of a plain `json.loads`."""
    value, marks = _decode(text)
    if marks or _SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_DEPTH:
        check(value)
    return value
