"""`clara-jax synthesize` end to end on real shared passages with a tiny random model, both through
`clara-jax serve` (remote backend) and in-process (local backend). A random model replies with junk:
what is checked is the pipeline's handling of it (no crash, every drop has a reason, the report adds
up, whatever records come out are valid stage-1 input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clara_jax.data.sources import read_records
from tests.server_process import free_port, running_server

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "clara_pretrain_sample.jsonl"
TRAIN_LINES = 800  # lines 0-799 are the train split
REASONS = {
    "questions_unparsable",
    "coverage_unparsable",
    "coverage_not_reached",
    "no_valid_qa",
    "paraphrase_unparsable",
    "paraphrase_copied",
    "paraphrase_rejected",
    "paraphrase_judge_unparsable",
    "backend_error",
    "prompt_too_long",
    "request_rejected",
}
pytestmark = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} is not on this machine")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The three shortest train passages, as CLaRa records (the `docs` field is read)."""
    with open(SHARED) as f:
        docs = [json.loads(line)["docs"][0] for _, line in zip(range(TRAIN_LINES), f)]
    path = tmp_path_factory.mktemp("synth") / "passages.jsonl"
    path.write_text("".join(json.dumps({"docs": [d]}) + "\n" for d in sorted(docs, key=len)[:3]))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(subprocess_compile_cache):
    """The tiny model's generation programs, compiled by one run (or the server), loaded by the next."""


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _synthesize(corpus: str, out: Path, *backend_args: str) -> dict:
    cmd = [sys.executable, "-m", "clara_jax.cli", "synthesize", "--corpus", corpus, "--out", str(out)]
    cmd += [
        *backend_args,
        "--shots",
        "0",
        "--max-rounds",
        "2",
        "--max-new-tokens",
        "32",
        "--parse-retries",
        "0",
    ]
    cmd += ["--no-progress"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "documents: read 3" in done.stdout
    return json.loads((out / "report.json").read_text())


def _check(report: dict, out: Path) -> None:
    d = report["documents"]
    assert report["complete"] and d["read"] == d["processed"] == 3
    assert d["kept"] + sum(d["dropped"].values()) == 3
    assert set(d["dropped"]) <= REASONS
    errors = sum(
        n for r, n in d["dropped"].items() if r in ("backend_error", "prompt_too_long", "request_rejected")
    )
    assert set(report["tracks"]) == {"simple_qa", "multihop_qa", "paraphrase"}
    for track in report["tracks"].values():
        assert track["kept"] + sum(track["dropped"].values()) == 3 - errors
        assert set(track["dropped"]) <= REASONS
    assert report["calls"]["total"] >= 3 * 3 - 3 * errors  # every passage asked all three tracks at least
    n_records = 0
    for path in out.glob("records-*.jsonl"):
        records, rr = read_records(path, "stage1")
        assert rr.kept == rr.read and not rr.skipped
        n_records += len(records)
    assert n_records == sum(report["records"].values())
    ledger = [json.loads(line) for p in out.glob("ledger-*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(e["doc"] for e in ledger) == [0, 1, 2]


def test_remote_backend_against_clara_jax_serve(corpus, tmp_path):
    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "clara_jax.cli",
        "serve",
        "--model",
        "tiny",
        "--port",
        str(port),
        "--no-access-log",
    ]
    with running_server(cmd, port, _env(), log_path, timeout=180) as (url, _):
        out = tmp_path / "remote"
        report = _synthesize(corpus, out, "--backend", "remote", "--base-url", url, "--concurrency", "8")
        assert report["backend"] == "remote:tiny"
        _check(report, out)


def test_local_backend_with_the_tiny_model(corpus, tmp_path):
    out = tmp_path / "local"
    report = _synthesize(corpus, out, "--backend", "local", "--model", "tiny", "--batch-size", "8")
    assert report["backend"] == "local:tiny"
    _check(report, out)
    # Rerunning a finished directory does nothing and keeps the same report counts.
    again = _synthesize(corpus, out, "--backend", "local", "--model", "tiny", "--batch-size", "8")
    assert again["this_run"]["documents"] == 0 and again["documents"] == report["documents"]
