"""A run killed at any moment resumes with nothing lost; bad checkpoints are skipped.

Each test drives the real CLI in a subprocess, as a user (or a TPU preemption) would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "clara_pretrain_sample.jsonl"
STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(subprocess_compile_cache):
    """Every run compiles the same train step: the first one compiles it, the others load it."""


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} (the shared SCP sample) is not beside the checkout")
    path = tmp_path_factory.mktemp("data") / "scp_train.jsonl"
    with open(SAMPLE) as src, open(path, "w") as dst:  # train lines only (0-799), a small slice
        for _, line in zip(range(96), src):
            dst.write(line)
    return path


def _command(workdir, train_file, steps=STEPS, extra=()):
    return [
        sys.executable,
        "-m",
        "clara_jax.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "stage1_scp.py") + ":tiny,runlocal",
        "--workdir",
        str(workdir),
        "--no-progress",
        f"--config.data.train={train_file}",
        f"--config.total_steps={steps}",
        "--config.checkpoint.every_steps=3",
        "--config.log_every=1",
        "--config.plot=false",
        "--config.clara.generator_max_length=256",
        *extra,
    ]


def _env():
    env = dict(os.environ)
    # one CPU device, like a user's laptop; compiled at -O0 like the rest of the suite (tests/conftest.py)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(workdir, train_file, steps=STEPS, extra=()):
    proc = subprocess.run(
        _command(workdir, train_file, steps, extra),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(workdir):
    rows = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows}


def _final_params(workdir):
    """The trainable parameters of the newest checkpoint, read back through orbax."""
    import orbax.checkpoint as ocp

    ckpt = Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    restored = ocp.StandardCheckpointer().restore(ckpt / str(step) / "state")
    return step, restored["params"]


def _flat(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _interrupt(workdir, train_file, sig, at_step):
    """Start a run and send `sig` once metrics.jsonl reaches `at_step`."""
    proc = subprocess.Popen(
        _command(workdir, train_file),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    metrics = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_step:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_file):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir, train_file)
    return workdir


def test_uninterrupted_run_is_deterministic(reference, train_file, tmp_path):
    _run(tmp_path, train_file)
    assert _losses(tmp_path) == _losses(reference)
    assert sorted(_losses(reference)) == list(range(1, STEPS + 1))


def test_kill_9_then_resume_equals_uninterrupted(reference, train_file, tmp_path):
    at = random.Random(os.getpid()).randint(2, STEPS - 2)
    code, _ = _interrupt(tmp_path, train_file, signal.SIGKILL, at)
    assert code == -signal.SIGKILL
    _run(tmp_path, train_file)
    assert _losses(tmp_path) == _losses(reference), f"killed at step ~{at}"
    step_a, params_a = _final_params(reference)
    step_b, params_b = _final_params(tmp_path)
    assert step_a == step_b == STEPS
    for a, b in zip(_flat(params_a), _flat(params_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_zero_then_resumes(reference, train_file, tmp_path):
    code, err = _interrupt(tmp_path, train_file, signal.SIGTERM, 4)
    assert code == 0, err[-2000:]
    assert "SIGTERM received: saved step" in err
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < STEPS
    _run(tmp_path, train_file)
    assert _losses(tmp_path) == _losses(reference)
    for a, b in zip(_flat(_final_params(reference)[1]), _flat(_final_params(tmp_path)[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_corrupted_newest_checkpoint_is_skipped(reference, train_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    newest = workdir / "checkpoints" / str(STEPS)
    for path in (newest / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"\x00garbage" * 4)  # the array data of step 10 is destroyed
    proc = _run(workdir, train_file, steps=STEPS + 2)
    assert f"checkpoints/{STEPS} is unreadable" in proc.stderr
    assert "resumed from" in proc.stderr and f"step {STEPS - 1}" in proc.stderr
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 3))


def test_non_finite_loss_stops_with_clear_error_and_keeps_last_good(train_file, tmp_path):
    proc = subprocess.run(
        _command(tmp_path, train_file, extra=["--config.optim.lr=1e30", "--config.optim.clip_norm=1e30"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite metrics at step" in proc.stderr
    saved = (
        [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
        if (tmp_path / "checkpoints").exists()
        else []
    )
    for step in saved:  # whatever was saved was saved before the divergence
        assert int(step) < STEPS


def _checkpoint_files(workdir):
    """{relative path: (size, mtime)} of every file under WORKDIR/checkpoints."""
    root = Path(workdir) / "checkpoints"
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_changed_lora_rank_on_resume_fails_naming_it_and_keeps_checkpoints(reference, train_file, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    before = _checkpoint_files(workdir)
    proc = subprocess.run(
        _command(
            workdir, train_file, steps=STEPS + 6, extra=["--config.lora.rank=4", "--config.data.num_epochs=2"]
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"checkpoints/{STEPS} does not fit this run's state" in proc.stderr
    assert "lora.rank: 8 -> 4" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" not in proc.stderr and "is unreadable" not in proc.stderr
    assert _checkpoint_files(workdir) == before  # nothing restored over, rotated away or added
    assert _losses(workdir) == _losses(reference)  # no step was run
