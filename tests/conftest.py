"""Test-wide settings: 8 simulated CPU devices (must be set before jax is imported), and the slow lane."""

import os

import pytest

# The suite's programs are tiny and run a few steps each, so compiling dominates: LLVM at -O0 halves
# XLA's CPU compile time (a tiny stage-3 step: 58 s -> 27 s on a loaded 2-core machine) for ~3x slower
# steps. Numerics are unchanged (no fast-math either way); the one long-running test,
# tests/test_stage3_learns.py, runs its experiment in a subprocess at the default level.
SUITE_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", SUITE_XLA_FLAGS)
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


# The suite runs in 2 processes (pytest-xdist, `-n 2 --dist loadfile` in pyproject.toml): each
# module goes whole to one worker, in this order, longest first (measured), so that neither worker
# is left with a long module at the end while the other idles. Other modules follow in file order.
LONGEST_FIRST = [
    "test_multiprocess",
    "test_training_faults",
    "test_stage3_learns",
    "test_demo",
    "test_train_step_sharding",
    "test_clara_core",
    "test_decoder",
    "test_convert_official_code",
    "test_serve",
    "test_stage3_diagnostics",
    "test_aot_compile",
    "test_gguf_smollm2",
    "test_inference",
    "test_hf_parity",
    "test_export_index",
    "test_synthesis_e2e",
    "test_model_dir_atomic",
    "test_convert",
    "test_phi3",
    "test_topk",
    "test_records_hostile",
    "test_records",
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in WHOLE_PROGRAM_MODULES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # stable: the tests of a module keep their order (module-scoped fixtures rely on it)
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="session")
def _compile_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_compile_cache"))


@pytest.fixture(scope="module")
def subprocess_compile_cache(_compile_cache_dir):
    """For modules whose subprocesses compile the same programs again and again (the CLI training
    runs of the fault tests, the synthesis runs): while the module runs, $JAX_COMPILATION_CACHE_DIR
    names a JAX persistent compilation cache shared by the subprocesses of this pytest process (one
    per xdist worker), so a train step compiled by the first run is loaded, not recompiled, by the
    next. This process's own JAX read its configuration at import and is unaffected. The loaded executable is the
    compiled one: runs stay bit-identical (the tests compare their losses exactly). Only programs that
    took over a second to compile are stored (JAX's default threshold). Not for servers whose tests
    depend on a cold start (tests/test_serve.py), nor for tests/test_multiprocess.py: a two-process
    CPU step program loaded from the cache hangs in its gloo collectives."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", _compile_cache_dir)
        yield
