"""The synthesis report, rebuilt from the ledgers so it covers every run that wrote into OUT.

Invariants a reader can check: `documents.read == documents.kept + sum(documents.dropped) +
documents.pending`, and for every enabled track `kept + sum(dropped) == documents.processed - errors`
(a document that failed in the backend has no track outcomes).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from clara_jax.synthesis.backends import BACKEND_ERROR
from clara_jax.synthesis.store import read_ledger, write_json_atomic

TRACKS = ("simple_qa", "multihop_qa", "paraphrase")


def _histogram(values: list[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def latest_entries(out_dir: str | Path) -> dict[int, dict]:
    """doc index -> its latest ledger entry, over every shard in the directory."""
    entries: dict[int, dict] = {}
    for path in sorted(Path(out_dir).glob("ledger-*.jsonl")):
        for entry in read_ledger(path)[0]:
            entries[int(entry["doc"])] = entry
    return entries


def document_reason(entry: dict) -> str:
    """Why a document produced no record: its error, else the first enabled track's drop reason."""
    if entry.get("status") == "error":
        return entry.get("error", BACKEND_ERROR)
    for track in TRACKS:
        summary = entry.get("tracks", {}).get(track)
        if summary and summary.get("dropped"):
            return summary["dropped"]
    return "no_records"


def build_report(
    out_dir: str | Path, *, n_read: int, corpus: str, backend: str, config: dict, this_run: dict
) -> dict:
    """Aggregate the ledgers into OUT/report.json (written atomically) and return it."""
    entries = {i: e for i, e in latest_entries(out_dir).items() if i < n_read}
    kept, dropped = 0, Counter()
    tracks: dict[str, dict] = {}
    records = Counter()
    pairs, parse_failures, repairs = Counter(), Counter(), Counter()
    calls = retries = prompt_tokens = completion_tokens = 0
    for entry in entries.values():
        c = entry.get("counters", {})
        calls += c.get("calls", 0)
        retries += c.get("retries", 0)
        prompt_tokens += c.get("prompt_tokens", 0)
        completion_tokens += c.get("completion_tokens", 0)
        pairs.update(c.get("pairs", {}))
        parse_failures.update(c.get("parse_failures", {}))
        repairs.update(c.get("repairs", {}))
        if entry.get("records"):
            kept += 1
        else:
            dropped[document_reason(entry)] += 1
        for name, summary in entry.get("tracks", {}).items():
            t = tracks.setdefault(name, {"kept": 0, "dropped": Counter(), "pairs": [], "rounds": []})
            if summary.get("kept"):
                t["kept"] += 1
                records[name] += 1
                if "pairs" in summary:
                    t["pairs"].append(summary["pairs"])
            else:
                t["dropped"][summary.get("dropped", "unknown")] += 1
            if "rounds" in summary:
                t["rounds"].append(summary["rounds"])
    track_report = {}
    for name in TRACKS:
        if name not in tracks:
            continue
        t = tracks[name]
        item = {"kept": t["kept"], "dropped": dict(t["dropped"].most_common())}
        if name != "paraphrase":
            n = len(t["pairs"])
            item["qa_pairs"] = {
                "total": sum(t["pairs"]),
                "mean_per_kept_document": round(sum(t["pairs"]) / n, 3) if n else 0.0,
                "histogram": _histogram(t["pairs"]),
            }
            item["rounds_histogram"] = _histogram(t["rounds"])
        track_report[name] = item
    processed = len(entries)
    report = {
        "corpus": corpus,
        "out": str(out_dir),
        "backend": backend,
        "config": config,
        "complete": processed == n_read,
        "documents": {
            "read": n_read,
            "processed": processed,
            "pending": n_read - processed,
            "kept": kept,
            "dropped": dict(dropped.most_common()),
        },
        "tracks": track_report,
        "records": {k: records[k] for k in TRACKS if k in records},
        "qa_pairs": dict(pairs.most_common()),
        "calls": {
            "total": calls,
            "parse_retries": retries,
            "parse_failures": dict(parse_failures.most_common()),
            "repairs": dict(repairs.most_common()),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        },
        "this_run": this_run,
    }
    write_json_atomic(Path(out_dir) / "report.json", report)
    return report


def format_report(report: dict) -> str:
    """A short human-readable table of the report."""
    d = report["documents"]
    lines = [
        f"documents: read {d['read']}, processed {d['processed']}, pending {d['pending']}, "
        f"kept {d['kept']} (at least one record), dropped {sum(d['dropped'].values())}"
    ]
    lines += [f"  dropped  {reason:<32} {n}" for reason, n in d["dropped"].items()]
    lines.append(f"{'track':<14}{'kept':>7}{'dropped':>9}  {'pairs/doc':>9}  reasons")
    for name, t in report["tracks"].items():
        per_doc = f"{t['qa_pairs']['mean_per_kept_document']:.2f}" if "qa_pairs" in t else "-"
        reasons = ", ".join(f"{k} {v}" for k, v in t["dropped"].items()) or "-"
        lines.append(f"{name:<14}{t['kept']:>7}{sum(t['dropped'].values()):>9}  {per_doc:>9}  {reasons}")
    c = report["calls"]
    lines.append(
        f"calls {c['total']} (parse retries {c['parse_retries']}), tokens {c['prompt_tokens']} prompt + "
        f"{c['completion_tokens']} completion; records {json.dumps(report['records'])}"
    )
    r = report["this_run"]
    rate = r.get("documents_per_second")
    lines.append(
        f"this run: {r['documents']} documents in {r['seconds']:.1f} s"
        + (f" ({rate:.3f} documents/s)" if rate else "")
        + (f"; {r['resumed_done']} were already done" if r.get("resumed_done") else "")
    )
    return "\n".join(lines)
