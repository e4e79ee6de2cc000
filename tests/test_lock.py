"""The installed environment is the locked one: a silent version drift is what once broke CI.

requirements/lock.txt (and requirements/nodeps.txt) are written by `bash scripts/lock.sh`;
scripts/bootstrap.sh installs exactly them. Any difference between the two fails here by name.
"""

import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILES = (ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "nodeps.txt")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
REFRESH = "bash scripts/bootstrap.sh (to install the lock) or bash scripts/lock.sh (to change it)"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.split(";")[0].strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for path in LOCK_FILES:
        pins.update(read_pins(path))
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    problems = []
    for name, want in sorted(pins.items()):
        got = have.get(name)
        if got is None:
            problems.append(f"{name}: locked at {want}, not installed")
        elif got != want:
            problems.append(f"{name}: locked at {want}, installed {got}")
    return problems


def test_lock_files_pin_the_core_stack():
    pins = locked()
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "peft", "torch"):
        assert name in pins, f"{name} is missing from requirements/lock.txt"
    assert pins["torch"].startswith("2.13.0"), "torch must be the CPU wheel that lies on this machine"


def test_installed_versions_equal_the_lock():
    problems = drift(locked(), installed())
    if problems:
        pytest.fail(
            f"the environment differs from the lock in {len(problems)} package(s):\n  "
            + "\n  ".join(problems)
            + f"\nRun {REFRESH}."
        )


def test_nothing_unlocked_is_installed():
    """A package installed by hand beside the lock is drift too (the venv's own seeds excepted)."""
    allowed = set(locked()) | {"clara-jax"}
    extra = sorted(set(installed()) - allowed)
    assert not extra, f"installed but not in requirements/lock.txt: {', '.join(extra)}. Run {REFRESH}."


def test_drift_names_each_package():
    message = "\n".join(drift({"peft": "0.21.2", "jax": "0.10.2"}, {"peft": "0.20.0"}))
    assert "peft: locked at 0.21.2, installed 0.20.0" in message
    assert "jax: locked at 0.10.2, not installed" in message
