"""Resumable, sharded synthesis output: records shards plus an append-only done-ledger per shard.

Why a ledger: a run over millions of passages will be killed (preemption, OOM, Ctrl-C) at arbitrary
points, and every document must still end up in the output exactly once. For each finished document
the store appends its records to `records-SSSSS.jsonl` and fsyncs, then appends one ledger line to
`ledger-SSSSS.jsonl` (the document's index, content hash, outcome, counters, and the records file's
size after its records) and fsyncs. On reopening, a torn last ledger line is cut off and the records
file is truncated to the size the last complete ledger line names, so records of a document whose
ledger line never landed disappear and the document is simply done again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clara_jax import file_io
from clara_jax.formats import jsonl


class StoreError(RuntimeError):
    """The output directory cannot be resumed (lost files, another corpus, other settings)."""


def shard_of(doc_index: int, num_shards: int) -> int:
    return doc_index % num_shards


def records_path(out_dir: str | os.PathLike, shard: int) -> Path:
    return Path(out_dir) / f"records-{shard:05d}.jsonl"


def ledger_path(out_dir: str | os.PathLike, shard: int) -> Path:
    return Path(out_dir) / f"ledger-{shard:05d}.jsonl"


def _append(path: Path, data: bytes) -> int:
    """Append, flush and fsync; returns the file's size afterwards."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def read_ledger(path: Path) -> tuple[list[dict], int]:
    """(complete entries, byte length of the complete prefix); a torn or garbled tail is ignored.

    Read by `jsonl.lines` with every byte kept (blank lines and a byte-order mark too): the prefix
    length is where a reopened store truncates the ledger."""
    if not path.exists():
        return [], 0
    entries, good = [], 0
    for _, line in jsonl.lines(path, keep_blank=True, strip_bom=False):
        if not line.endswith(b"\n"):
            break
        try:
            entry = jsonl.decode(line)
        except ValueError:  # a JsonProblem: a line the writer did not finish or that was damaged
            break
        if not isinstance(entry, dict) or "doc" not in entry or "records_end" not in entry:
            break
        entries.append(entry)
        good += len(line)
    return entries, good


class ShardStore:
    """One shard's records and ledger, repaired on open; `done` maps doc index -> latest entry."""

    def __init__(self, out_dir: str | os.PathLike, shard: int):
        self.shard = shard
        self.records = records_path(out_dir, shard)
        self.ledger = ledger_path(out_dir, shard)
        self.repaired: list[str] = []
        entries, good = read_ledger(self.ledger)
        if self.ledger.exists() and self.ledger.stat().st_size > good:
            self.repaired.append(
                f"{self.ledger.name}: cut a torn tail of {self.ledger.stat().st_size - good} bytes"
            )
            os.truncate(self.ledger, good)
        end = entries[-1]["records_end"] if entries else 0
        size = self.records.stat().st_size if self.records.exists() else 0
        if size < end:
            raise StoreError(
                f"{self.records}: {size} bytes, but {self.ledger.name} says {end} were written; the records "
                "file was truncated or replaced outside this tool. Move the directory aside and start again."
            )
        if size > end:
            self.repaired.append(f"{self.records.name}: cut {size - end} bytes of an unfinished document")
            os.truncate(self.records, end)
        self.done: dict[int, dict] = {}
        for entry in entries:
            self.done[int(entry["doc"])] = entry
        self._size = end

    def commit(self, entry: dict, record_lines: list[str]) -> None:
        """Make one finished document durable: its records first, then its ledger line."""
        if record_lines:
            self._size = _append(self.records, "".join(line + "\n" for line in record_lines).encode())
        entry = {**entry, "records_end": self._size}
        _append(self.ledger, (json.dumps(entry, ensure_ascii=False) + "\n").encode())
        self.done[int(entry["doc"])] = entry


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    file_io.write_json_atomic(path, obj, ensure_ascii=False)


def check_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Write OUT/manifest.json, or refuse to resume under different settings (naming each one)."""
    path = Path(out_dir) / "manifest.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(
                f"{path}: unreadable ({err}); move the directory aside and start again"
            ) from None
        diffs = [
            f"{key}: {old.get(key)!r} in the directory, {manifest.get(key)!r} now"
            for key in sorted(set(old) | set(manifest))
            if key != "backend" and old.get(key) != manifest.get(key)
        ]
        if diffs:
            raise StoreError(
                f"{out_dir} was started with other settings ({'; '.join(diffs)}); resume with the same "
                "settings or use another --out"
            )
        return
    write_json_atomic(path, manifest)
