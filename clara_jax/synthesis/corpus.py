"""The passages to synthesise from: JSONL, one document per line, read lazily and located by line.

The accepted rows are the corpus format's loose reading (`clara_jax.formats.corpus.loose_passage`):
`text` (with an optional `title`, joined as "title\\ntext"), `contents` / `passage` /
`paragraph_text` (common retrieval corpora), or a CLaRa record's document list `docs` / `context` /
`content` (its first entry), so the shared stage-1 sample works as-is. An `id` (or `_id` / `doc_id`)
is kept for the report; otherwise the document is known by its line.

Lines are read by `clara_jax.formats.jsonl` as standard JSON (`strict_json`): a lone surrogate, NaN,
a duplicate key, an oversized integer or deep nesting is refused here with `path:line`, not mid-run
where the text is encoded or tokenized (which would stop every rerun at the same document).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from clara_jax.formats import jsonl
from clara_jax.formats.corpus import loose_passage


@dataclass(frozen=True)
class Document:
    index: int  # 0-based position among the corpus's documents (blank lines do not count)
    line: int  # 1-based line in the file
    id: str
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def read_documents(path: str, limit: int | None = None) -> Iterator[Document]:
    """Documents in file order; a malformed line raises ValueError naming `path:line`."""
    if limit is not None and limit <= 0:
        with open(path, "rb"):  # (a missing file is still an error)
            return
    rows = jsonl.iter_json_lines(path, strict=True, expected="a document line of standard JSON")
    for index, (line_no, obj) in enumerate(rows):
        doc_id, text = loose_passage(obj, f"{path}:{line_no}")
        yield Document(
            index=index, line=line_no, id=str(doc_id if doc_id is not None else line_no), text=text
        )
        if limit is not None and index + 1 >= limit:
            return
