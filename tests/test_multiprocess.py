"""Two OS processes joined by `jax.distributed` train exactly like one process with 8 devices.

Each of the two processes has 4 simulated CPU devices; they meet over localhost (JAX's
coordination service, gloo collectives) and run `clara-jax train` on one mesh of all 8
devices: data=2 within each process, fsdp=2 within a process times 2 across processes (a
hybrid DCN mesh), so every parameter is split between the processes. The reference is one
process with 8 devices on the plain data=2 x fsdp=4 mesh, uninterrupted. The two processes
first train until process 1 alone receives SIGTERM (a preemption notice): JAX's preemption
sync service must make both save the same step N and exit 0. Two fresh processes then resume
from that checkpoint to the last step, and everything (per-step losses, checkpointed
parameters, the exported model) must equal the reference.

Every subprocess is bounded: a short `jax.distributed` initialization timeout, a timeout on
the whole run, and on any failure both process groups are killed and their stderr printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clara_jax.parallel.distributed import DistributedConfig, initialize_distributed

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "clara_pretrain_sample.jsonl"
LAST = 6  # steps of the whole run; the first two-process run is stopped well before
RUN_TIMEOUT = 420  # seconds for one run (both processes); a hang fails, it never blocks CI
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLARA_JAX_")}
    env.update(
        JAX_PLATFORMS="cpu",
        # -O0: the suite's compile-time setting (tests/conftest.py); every run here compiles afresh
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def _command(workdir: Path, train_file: Path, steps: int, extra=()) -> list[str]:
    # bucket = generator length: every batch has one shape, so each run compiles one step program
    return [
        sys.executable,
        "-m",
        "tests.multiprocess_worker",
        "train",
        "--config",
        str(ROOT / "configs" / "stage1_scp.py") + ":tiny,runlocal",
        "--workdir",
        str(workdir),
        "--no-progress",
        f"--config.data.train={train_file}",
        f"--config.total_steps={steps}",
        "--config.checkpoint.every_steps=1",
        f"--config.checkpoint.keep={LAST}",
        "--config.log_every=1",
        "--config.clara.generator_max_length=128",
        "--config.data.bucket=128",
        "--config.optim.schedule=constant",  # the learning rate must not depend on total_steps
        "--config.optim.warmup_ratio=0",
        "--config.peak_flops=1e12",  # skip the matmul measurement
        *extra,
    ]


def _run_processes(commands: list[list[str]], envs: list[dict], logs: Path, interrupt=None) -> list[str]:
    """Start all commands, wait for all (bounded); on any failure kill every process group.

    `interrupt` = (metrics.jsonl path, rows, index): SIGTERM process `index` once the file has
    that many rows."""
    procs, files = [], []
    for i, (cmd, env) in enumerate(zip(commands, envs)):
        out = open(logs.with_suffix(f".{i}.log"), "w+")
        files.append(out)
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    deadline, failed = time.monotonic() + RUN_TIMEOUT, None
    while any(p.poll() is None for p in procs):
        if interrupt is not None:
            path, rows, index = interrupt
            if path.exists() and len(path.read_text().splitlines()) >= rows:
                procs[index].send_signal(signal.SIGTERM)
                interrupt = None
        if time.monotonic() > deadline:
            failed = f"timed out after {RUN_TIMEOUT} s"
        elif any(p.returncode not in (None, 0) for p in procs):
            failed = "a process failed"
        if failed:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read())
        f.close()
    if failed or any(p.returncode != 0 for p in procs):
        tails = "\n".join(
            f"--- process {i} (exit {p.returncode}) ---\n{_tail(t)}"
            for i, (p, t) in enumerate(zip(procs, texts))
        )
        pytest.fail(f"{failed or 'a process failed'}:\n{tails}")
    assert interrupt is None, "the run ended before the interruption was sent"
    return texts


def _tail(text: str, lines: int = 40) -> str:
    keep = [line for line in text.splitlines() if "[Gloo]" not in line and "spmd_partitioner" not in line]
    return "\n".join(keep[-lines:])


def _two_processes(workdir: Path, train_file: Path, tag: str, interrupt=None) -> dict:
    port = _free_port()
    commands, envs = [], []
    for pid in range(2):
        commands.append(
            _command(
                workdir,
                train_file,
                LAST,
                [
                    "--config.mesh=data=2,fsdp=2,tensor=1",
                    "--dcn-mesh=fsdp=2",
                    "--config.checkpoint.every_steps=100",  # only the preemption save and the final one
                    f"--coordinator=localhost:{port}",
                    "--num-processes=2",
                    f"--process-id={pid}",
                ],
            )
        )
        writes = workdir.parent / f"{tag}-writes-{pid}.json"
        envs.append(_env(4, CLARA_JAX_INIT_TIMEOUT="60", MP_WATCH=str(workdir), MP_WRITES=str(writes)))
    logs = _run_processes(commands, envs, workdir.parent / tag, interrupt)
    writes = [json.loads((workdir.parent / f"{tag}-writes-{pid}.json").read_text()) for pid in range(2)]
    return {"logs": logs, "writes": writes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} (the shared SCP sample) is not beside the checkout")
    root = tmp_path_factory.mktemp("multiprocess")
    train_file = root / "scp_train.jsonl"
    with open(SAMPLE) as src, open(train_file, "w") as dst:  # train lines only, a small slice
        for _, line in zip(range(64), src):
            dst.write(line)
    reference = root / "one_process"
    _run_processes(
        [
            _command(
                reference, train_file, LAST, ["--config.mesh=data=2,fsdp=4,tensor=1", "--config.plot=false"]
            )
        ],
        [_env(8)],
        root / "reference",
    )
    two = root / "two_processes"
    # SIGTERM to process 1 only, once step 1 is logged (process 0 writes the metrics)
    first = _two_processes(two, train_file, "first", interrupt=(two / "metrics.jsonl", 1, 1))
    losses_first = _losses(two)
    saved = [_saved_step(log) for log in first["logs"]]
    resumed = _two_processes(two, train_file, "resumed")
    return dict(
        reference=reference, two=two, first=first, resumed=resumed, losses_first=losses_first, saved=saved
    )


def _saved_step(log: str) -> int | None:
    match = re.search(r"SIGTERM received: saved step (\d+), exiting", log)
    return int(match.group(1)) if match else None


def _losses(workdir: Path) -> dict:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows}


def _steps(workdir: Path) -> list[int]:
    return [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]


def _params(workdir: Path, step: int) -> list[np.ndarray]:
    """The trainable parameters of a checkpoint, read back through orbax as host arrays."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
    restored = ocp.StandardCheckpointer().restore(path, target)
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def _assert_params_equal(a: list, b: list):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, atol=1e-5)


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
    saved = runs["saved"]
    assert saved[0] is not None and saved[0] == saved[1], _tail(runs["first"]["logs"][1])
    assert 1 <= saved[0] < LAST
    assert sorted(_steps(runs["two"])) == [saved[0], LAST]  # the preemption save, then the final one


def test_two_processes_train_like_one_process(runs):
    reference = _losses(runs["reference"])
    assert sorted(reference) == list(range(1, LAST + 1))
    first, stop = runs["losses_first"], runs["saved"][0]
    assert sorted(first) == list(range(1, stop + 1))
    np.testing.assert_allclose(
        [first[s] for s in sorted(first)], [reference[s] for s in sorted(first)], **TOLERANCE
    )
    # the parameters the two processes checkpointed together when they stopped
    _assert_params_equal(_params(runs["reference"], stop), _params(runs["two"], stop))
    # both processes really were one run: a mesh over 8 devices, and process i of 2
    for pid, log in enumerate(runs["first"]["logs"]):
        assert "data=2 fsdp=4 tensor=1 (8 cpu devices" in log, _tail(log)
        assert f"process {pid} of 2" in log, _tail(log)


def test_resume_from_a_two_process_checkpoint_equals_uninterrupted(runs):
    for log in runs["resumed"]["logs"]:
        assert f"resumed from {runs['two'] / 'checkpoints'} step {runs['saved'][0]}" in log, _tail(log)
    reference, resumed = _losses(runs["reference"]), _losses(runs["two"])
    assert sorted(resumed) == list(range(1, LAST + 1))
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, LAST + 1)], [reference[s] for s in range(1, LAST + 1)], **TOLERANCE
    )
    _assert_params_equal(_params(runs["reference"], LAST), _params(runs["two"], LAST))
    # the model directory process 0 wrote from parameters gathered over both processes
    from safetensors.numpy import load_file

    for name in ("adapters.safetensors", "embed_rows.safetensors"):
        ours, theirs = load_file(runs["two"] / "model" / name), load_file(runs["reference"] / "model" / name)
        assert sorted(ours) == sorted(theirs) and ours
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5, err_msg=f"{name}:{key}")


def test_only_process_zero_writes_logs_plots_and_model(runs):
    for run in ("first", "resumed"):
        main, other = runs[run]["writes"]
        assert "metrics.jsonl" in main and "config.json" in main, main  # the audit hook does see writes
        assert any(p.startswith("tensorboard/") for p in main), main
        outside = [p for p in other if p != "checkpoints" and not p.startswith("checkpoints/")]
        assert outside == [], f"process 1 wrote {outside} in the {run} run"
        assert any(p.startswith("checkpoints/") for p in other), "process 1 took no part in the checkpoint"
    main = runs["resumed"]["writes"][0]
    # the model directory is built in a hidden sibling (.model.new.PID) and swapped in whole
    wrote_model = any(p.startswith(".model.new.") and "clara.json" in p for p in main)
    assert wrote_model and any(p.endswith(".png") for p in main), main
    assert (runs["two"] / "model" / "clara.json").is_file()


def test_distributed_config_from_flags_and_environment():
    env = {
        "CLARA_JAX_COORDINATOR": "10.0.0.1:1234",
        "CLARA_JAX_NUM_PROCESSES": "4",
        "CLARA_JAX_PROCESS_ID": "3",
    }
    cfg = DistributedConfig.from_args(environ=env)
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.enabled) == ("10.0.0.1:1234", 4, 3, True)
    flags = DistributedConfig.from_args("off", "host:99", 2, 1, environ=env)  # flags win
    assert (flags.coordinator, flags.num_processes, flags.process_id) == ("host:99", 2, 1)
    assert not DistributedConfig.from_args(environ={}).enabled  # single process: a no-op
    assert not DistributedConfig(num_processes=1, process_id=0, coordinator="h:1").enabled
    assert DistributedConfig.from_args("auto", environ={}).enabled
    assert DistributedConfig.from_args(environ={"CLARA_JAX_INIT_TIMEOUT": "7"}).initialization_timeout == 7
    assert initialize_distributed(DistributedConfig()) is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator="no-port"), "expected HOST:PORT"),
        (dict(num_processes=2, process_id=2), r"outside \[0, 2\)"),
        (dict(num_processes=0), "expected >= 1"),
        (dict(mode="sometimes"), "expected one of"),
    ],
)
def test_distributed_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_bad_environment_and_incomplete_flags_are_refused_before_jax_starts():
    with pytest.raises(ValueError, match="CLARA_JAX_NUM_PROCESSES='two'"):
        DistributedConfig.from_args(environ={"CLARA_JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="needs --coordinator"):
        initialize_distributed(DistributedConfig(num_processes=2, process_id=1))
