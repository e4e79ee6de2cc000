"""JSON Lines: the one reader of `.jsonl` files in the package, ours and users'.

What a line is, for every reader (training records, corpora, questions, metrics.jsonl, ledgers):
- lines end at b"\\n" (a "\\r\\n" line's "\\r" is whitespace to JSON) and are numbered from 1;
  blank lines keep their number, so `path:N` is the line an editor shows;
- a UTF-8 byte-order mark at the start of line 1 is dropped (some editors write one);
- a blank line (ASCII whitespace only) is skipped, and counted through `on_blank`; a reader that
  must see every byte (a ledger measuring its complete prefix) asks for them with `keep_blank`;
- a line longer than `max_bytes` is never read into memory whole: it comes back as `TooLong`.

`decode` turns one line into a JSON value, or a `JsonProblem` saying what is wrong: `strict=True`
(standard JSON only, see `strict_json`) for files users give us, lax (Python's json: NaN allowed,
a repeated key keeps its last value) for files we write ourselves. `iter_json_lines` puts the two
together and raises a `JsonLinesError`, `path:N: expected WHAT, got WHAT WAS FOUND`, at the first
line that is not JSON; callers that keep going past a bad line (`clara_jax.data.sources` with
`policy="skip"`) use `lines` and `decode` themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from clara_jax.formats import strict_json
from clara_jax.formats.strict_json import JsonProblem

BOM = b"\xef\xbb\xbf"
# The JSON grammar's whitespace: what a lax decode strips (str.strip would also take e.g. U+00A0,
# which JSON does not allow).
_JSON_WHITESPACE = " \t\r\n"


class TooLong(NamedTuple):
    """A line of `size` bytes, over the reader's `max_bytes` (its bytes were skipped, not kept)."""

    size: int


class JsonLinesError(ValueError):
    """A line that is not what the reader expected: `path:line: expected ..., got ...`."""

    def __init__(self, path: str | os.PathLike, line: int, expected: str, got: str, kind: str = ""):
        self.path, self.line, self.expected, self.got, self.kind = str(path), line, expected, got, kind
        super().__init__(f"{self.path}:{line}: expected {expected}, got {got}")


def lines(
    path: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    keep_blank: bool = False,
    on_blank: Callable[[int], None] | None = None,
    strip_bom: bool = True,
) -> Iterator[tuple[int, bytes | TooLong]]:
    """(line number from 1, the line's bytes with their newline) for every non-blank line.

    `keep_blank` yields blank lines too (then `on_blank` is not called); `strip_bom=False` keeps a
    leading byte-order mark (for a reader that counts bytes). A line over `max_bytes` is yielded
    as `TooLong(size)` and the rest of it is skipped in 1 MiB reads."""
    with open(path, "rb") as f:
        line_no = 0
        while data := (f.readline() if max_bytes is None else f.readline(max_bytes + 1)):
            line_no += 1
            if max_bytes is not None and len(data) > max_bytes:
                size = len(data)
                while not data.endswith(b"\n") and (data := f.readline(1 << 20)):  # skip the rest
                    size += len(data)
                yield line_no, TooLong(size)
                continue
            if strip_bom and line_no == 1 and data.startswith(BOM):
                data = data[len(BOM) :]
            if not data.strip() and not keep_blank:
                if on_blank is not None:
                    on_blank(line_no)
                continue
            yield line_no, data


def decode(data: bytes | str, *, strict: bool = False) -> Any:
    """One line's JSON value; a `JsonProblem` (a ValueError with `got` and `kind`) if it is not one.

    strict: `strict_json` (standard JSON within its depth limit, a byte-order mark dropped);
    lax: Python's json, as our own writers (json.dumps) produce it."""
    if strict:
        text = strict_json.decode_utf8(data) if isinstance(data, bytes) else data
        # strip: a trailing newline would move errors to "column 1"
        return strict_json.loads_checked(text.strip())
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = data[exc.start : exc.start + 1].hex()
            got = f"invalid UTF-8 (byte 0x{bad} at byte offset {exc.start})"
            raise JsonProblem(got, "invalid UTF-8", pos=exc.start) from None
    try:
        return json.loads(data.strip(_JSON_WHITESPACE))
    except json.JSONDecodeError as exc:
        got = f"malformed JSON ({exc.msg} at column {exc.colno})"
        raise JsonProblem(got, "malformed JSON", pos=exc.pos) from None
    except RecursionError:
        raise JsonProblem("JSON nested too deeply for Python's decoder", "too deep") from None


def iter_json_lines(
    path: str | os.PathLike,
    *,
    strict: bool = False,
    expected: str = "a JSON value",
    max_bytes: int | None = None,
) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) for every non-blank line; the first line that is not JSON (or is
    longer than `max_bytes`) raises `JsonLinesError` naming the file, the line, `expected` and what
    the line holds instead."""
    for line_no, data in lines(path, max_bytes=max_bytes):
        if isinstance(data, TooLong):
            got = f"a line of {data.size:,} bytes (at most {max_bytes:,} are read)"
            raise JsonLinesError(path, line_no, expected, got, "line too long")
        try:
            value = decode(data, strict=strict)
        except JsonProblem as problem:
            raise JsonLinesError(path, line_no, expected, problem.got, problem.kind) from None
        yield line_no, value


def read_json_lines(path: str | os.PathLike) -> list:
    """Every non-blank line of a JSONL file we wrote ourselves (lax JSON), parsed; a bad line raises
    `JsonLinesError` with its line number. Files from users go through `clara_jax.data.sources`,
    which checks every record against its stage's schema."""
    return [value for _, value in iter_json_lines(path)]
