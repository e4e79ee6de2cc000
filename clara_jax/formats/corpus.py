"""A corpus of passages: one row per document, `{"id": ID, "text": TEXT[, "title": TITLE]}`.

This is the corpus `clara-jax export` compresses (and so the ids `clara-jax search` returns) and
the passages `clara-jax synthesize` writes questions for. It is read in two ways:

- `read_corpus` (export): the schema exactly. `id` is a non-empty string (an integer is taken as
  its decimal string) and unique, `text` a non-blank string, `title` (optional) a string joined
  as "title\\ntext" when not blank. The text is used as written (not stripped): it is what gets
  compressed and fingerprinted (`corpus_sha256` in an export's manifest), so changing it would
  refuse every resume of an existing export. JSONL (exact line numbers), a JSON array or Parquet.
- `loose_passage` (synthesis): the schema plus the names other retrieval corpora use, so a
  passage file from elsewhere works as it is: the text is the first present of `text` (title
  joined, stripped), `contents` / `passage` / `paragraph_text`, or the first entry of a CLaRa
  record's document list `docs` / `context` / `content`; a bare JSON string is a text; the id is
  the first present of `id` / `_id` / `doc_id` and may be absent (the caller names the document by
  its line). The text is stripped; synthesis hashes that text in its ledger, so this rule stays too.

Errors name `path:line` (or `path: row N`), the field, and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from clara_jax.formats import jsonl

ID, TEXT, TITLE = "id", "text", "title"
SUFFIXES = (".jsonl", ".json", ".parquet")
# What `loose_passage` accepts besides `text` / `id`, in the order it looks.
TEXT_FIELDS = (TEXT, "contents", "passage", "paragraph_text")
LIST_FIELDS = ("docs", "context", "content")
ID_FIELDS = (ID, "_id", "doc_id")
ROW = "a JSON object {'id', 'text'[, 'title']}"


# --- the schema, exactly (export) ------------------------------------------------------------------


def passage(obj, where: str) -> tuple[str, str]:
    """(id, text) of one corpus row; ValueError naming `where` and the field otherwise."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object {{'id', 'text'[, 'title']}}, got {type(obj).__name__}")
    doc_id, text, title = obj.get(ID), obj.get(TEXT), obj.get(TITLE)
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise ValueError(f"{where}: field 'id' must be a non-empty string, got {doc_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: document {doc_id!r} has an empty or missing 'text' ({text!r})")
    if title is not None:
        if not isinstance(title, str):
            raise ValueError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
        if title.strip():
            text = f"{title}\n{text}"
    return doc_id, text


def corpus_rows(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(location label, raw row) per document; JSONL (read by `jsonl`) keeps exact line numbers."""
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        for line_no, obj in jsonl.iter_json_lines(path, expected=ROW):
            yield f"{path}:{line_no}", obj
    elif suffix in (".json", ".parquet"):
        import datasets

        builder = "parquet" if suffix == ".parquet" else "json"
        dataset = datasets.load_dataset(builder, data_files=[path], split="train")
        for i, row in enumerate(dataset):
            yield f"{path}: row {i}", row
    else:
        raise ValueError(f"cannot read corpus {path}: expected .jsonl, .json or .parquet, got {suffix!r}")


def read_corpus(path: str | os.PathLike) -> tuple[list[str], list[str], str]:
    """(ids, texts, sha256 of the ordered (id, text) pairs); duplicates and blanks name their line."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    ids, texts, first_seen = [], [], {}
    h = hashlib.sha256()
    for where, obj in corpus_rows(path):
        doc_id, text = passage(obj, where)
        if doc_id in first_seen:
            raise ValueError(f"{where}: duplicate id {doc_id!r} (first at {first_seen[doc_id]})")
        first_seen[doc_id] = where
        ids.append(doc_id)
        texts.append(text)
        h.update(json.dumps([doc_id, text]).encode() + b"\n")
    if not ids:
        raise ValueError(f"{path}: the corpus has no documents")
    return ids, texts, h.hexdigest()


def texts_of(path: str | os.PathLike, ids) -> dict[str, str]:
    """The texts of the documents named in `ids`, reading the corpus only until all are found (a
    search shows a few passages of a corpus that may hold millions)."""
    wanted, found = set(ids), {}
    for where, obj in corpus_rows(path):
        doc_id, text = passage(obj, where)
        if doc_id in wanted and doc_id not in found:
            found[doc_id] = text
            if len(found) == len(wanted):
                break
    return found


# --- the schema and other corpora's names (synthesis) ----------------------------------------------


def _loose_text(obj: dict, where: str) -> str:
    for name in TEXT_FIELDS:
        value = obj.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
            title = obj.get(TITLE)
            if name == TEXT and isinstance(title, str) and title.strip():
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


def loose_passage(obj, where: str) -> tuple[object | None, str]:
    """(id as found, or None; stripped text) of one passage in any of the accepted spellings."""
    if isinstance(obj, str):
        obj = {TEXT: obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'text' field, got {type(obj).__name__}")
    text = _loose_text(obj, where).strip()
    if not text:
        raise ValueError(f"{where}: the document text is empty")
    return next((obj[k] for k in ID_FIELDS if obj.get(k) is not None), None), text
