"""The passages to synthesise from: JSONL, one document per line, read lazily and located by line.

Accepted per line (first present wins): `text` (with an optional `title`, joined as "title\\ntext"),
`contents` / `passage` / `paragraph_text` (common retrieval corpora), or a CLaRa record's document
list `docs` / `context` / `content` (its first entry), so the shared stage-1 sample works as-is.
An `id` (or `_id` / `doc_id`) is kept for the report; otherwise the document is known by its line.

Lines are standard JSON (`strict_json`): a lone surrogate, NaN, a duplicate key, an oversized integer
or deep nesting is refused here with `path:line`, not mid-run where the text is encoded or tokenized
(which would stop every rerun at the same document).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from clara_jax.data.strict_json import JsonProblem, decode_utf8, loads_checked

TEXT_FIELDS = ("text", "contents", "passage", "paragraph_text")
LIST_FIELDS = ("docs", "context", "content")
ID_FIELDS = ("id", "_id", "doc_id")


@dataclass(frozen=True)
class Document:
    index: int  # 0-based position among the corpus's documents (blank lines do not count)
    line: int  # 1-based line in the file
    id: str
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def _text(obj: dict, where: str) -> str:
    for name in TEXT_FIELDS:
        value = obj.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
            title = obj.get("title")
            if name == "text" and isinstance(title, str) and title.strip():
                value = f"{title.strip()}\n{value}"
            return value
    for name in LIST_FIELDS:
        value = obj.get(name)
        if value is not None:
            if isinstance(value, str):
                return value
            if not isinstance(value, list) or not value or not isinstance(value[0], str):
                raise ValueError(
                    f"{where}: field '{name}': expected a non-empty list of strings, got {value!r:.80}"
                )
            return value[0]
    raise ValueError(
        f"{where}: no document text; expected one of the fields {TEXT_FIELDS + LIST_FIELDS}, got keys {sorted(obj)}"
    )


def _decode(data: bytes, where: str) -> Any:
    """One line's JSON value, or a ValueError naming `where` and what is wrong with it."""
    try:
        return loads_checked(decode_utf8(data).strip())
    except JsonProblem as err:
        raise ValueError(f"{where}: expected a document line of standard JSON, got {err.got}") from None


def read_documents(path: str, limit: int | None = None) -> Iterator[Document]:
    """Documents in file order; a malformed line raises ValueError naming `path:line`."""
    index = 0
    with open(path, "rb") as f:
        for line_no, data in enumerate(f, start=1):
            if limit is not None and index >= limit:
                return
            if line_no == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            if not data.strip():
                continue
            where = f"{path}:{line_no}"
            obj = _decode(data, where)
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{where}: expected a JSON object with a 'text' field, got {type(obj).__name__}"
                )
            text = _text(obj, where).strip()
            if not text:
                raise ValueError(f"{where}: the document text is empty")
            doc_id = next((obj[k] for k in ID_FIELDS if obj.get(k) is not None), None)
            yield Document(
                index=index, line=line_no, id=str(doc_id if doc_id is not None else line_no), text=text
            )
            index += 1
