"""Test-wide settings: 8 simulated CPU devices (must be set before jax is imported), and the slow lane."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Modules whose every test runs a whole program (subprocesses, servers, full training runs):
# all of them belong to the slow lane. Single slow tests elsewhere carry @pytest.mark.slow.
WHOLE_PROGRAM_MODULES = {
    "test_demo",
    "test_multiprocess",
    "test_serve",
    "test_synthesis_e2e",
    "test_training_faults",
    "test_aot_compile",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in WHOLE_PROGRAM_MODULES:
            item.add_marker(pytest.mark.slow)
