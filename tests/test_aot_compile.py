"""`clara-jax compile`: the real train step compiled ahead of time for a described TPU slice.

Compilations run in a subprocess so that libtpu is never loaded into the pytest process (jax
would then probe for a TPU in every later test). They are skipped only when libtpu is not
installed (neither the `[tpu]` extra nor scripts/bootstrap.sh's aside copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clara_jax.training.aot import HBM_GIB, AotError, Topology, abstract_batch, abstract_model, find_libtpu
from clara_jax.training.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1 = os.path.join(ROOT, "configs", "stage1_scp.py")
LIBTPU = find_libtpu()
needs_libtpu = pytest.mark.skipif(
    LIBTPU is None,
    reason="libtpu is not installed (pip install 'clara_jax[tpu]' or run scripts/bootstrap.sh, which "
    "installs it aside in .venv/libtpu-aside)",
)


def run_compile(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "clara_jax.cli", "compile", "--config", f"{STAGE1}:tiny,runlocal", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_topology_specs_parse_and_bad_ones_say_what_is_expected():
    t = Topology.parse("v5e:4x4")
    assert (t.generation, t.shape, t.slices, t.chips_per_slice) == ("v5e", (4, 4), 1, 16)
    assert t.hbm_bytes == 16 * 2**30 and t.accelerator_type == "v5litepod-16"
    t = Topology.parse("v5p:2x2x1")
    assert (t.shape, t.hbm_bytes, t.accelerator_type) == ((2, 2, 1), int(95 * 2**30), "v5p-8")
    t = Topology.parse("v5e:4x4x2slices")
    assert (t.shape, t.slices, t.name) == ((4, 4), 2, "v5e:4x4x2slices")
    assert Topology.parse("v5litepod:2x2").generation == "v5e"
    with pytest.raises(AotError, match="v5p slices are 3-D"):
        Topology.parse("v5p:2x2")
    with pytest.raises(AotError, match="unknown TPU generation 'v9'"):
        Topology.parse("v9:2x2")
    with pytest.raises(AotError, match="expected GENERATION:AxB"):
        Topology.parse("v5e-16")
    assert set(HBM_GIB) == {"v4", "v5e", "v5p", "v6e"}


def test_the_7b_model_and_batch_are_shapes_only():
    """Mistral-7B's stage-3 state is built abstractly: nothing of its 7B weights is allocated."""
    config = load_config_file(f"{os.path.join(ROOT, 'configs', 'stage3_e2e.py')}:mistral_7b")
    model, clara = abstract_model(config)
    leaves = jax.tree.leaves(model)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert model.embed.get_value().shape == (32000 + 8 + 3, 4096)  # CLaRa rows added, n_mem = 256 // 32
    assert sum(x.size for x in leaves) > 7e9
    batch = abstract_batch(config, clara.n_mem)
    micro = config.batch.micro_size
    # the candidates arrive compressed (the candidate cache): 20 per question, 8 vectors of 4096
    assert batch["cand_memory"].shape == (32 // micro, micro, 20, 8, 4096) and "enc_ids" not in batch
    assert batch["cand_memory"].dtype == jax.numpy.bfloat16
    config.data.cache_candidates = False  # re-compressed in the step instead
    batch = abstract_batch(config, clara.n_mem)
    assert batch["enc_ids"].shape == (32 // micro, micro * 20, 256 + 3 + 8) and "cand_memory" not in batch
    assert batch["query_ids"].shape == (32 // micro, micro, 1024 + 3 + 8)  # the official query limit
    assert batch["gen_ids"].shape == (32 // micro, micro, 1024)
    assert batch["cand_valid"].dtype == jax.numpy.bool_


def test_the_abstract_batch_bounds_what_the_pipeline_produces():
    """Same keys and dtypes as real stage-3 batches, and no dimension shorter than theirs, even
    with over-long documents and questions (the worst case the compiled step must hold)."""
    from clara_jax.data.pipeline import BatchIterator
    from clara_jax.data.records import RetrievalRecord
    from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.model.presets import preset
    from clara_jax.training.run_spec import layout_config

    config = load_config_file(f"{os.path.join(ROOT, 'configs', 'stage3_e2e.py')}:tiny,runlocal")
    n_mem = config.clara.doc_max_length // config.clara.compression_rate
    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=n_mem)
    words = " ".join(f"word{i}" for i in range(300))
    records = [
        RetrievalRecord(f"{words} {i}?", "yes", ("yes",), tuple(f"{words} {j}" for j in range(20)), (0,))
        for i in range(config.batch.global_size)
    ]
    hidden = preset(config.model.preset).hidden_size

    def cached(texts):  # what CandidateCache.lookup returns: [n, n_mem, D] and truncation flags
        return np.zeros((len(texts), n_mem, hidden), np.float32), np.zeros(len(texts), bool)

    for cache in (True, False):
        config.data.cache_candidates = cache
        real = next(
            BatchIterator(
                records,
                tok,
                "stage3",
                layout_config(config),
                global_size=config.batch.global_size,
                micro_size=config.batch.micro_size,
                seed=0,
                candidate_memory=cached if cache else None,
            )
        )
        bound = abstract_batch(config, n_mem)
        assert set(real) == set(bound)
        for key, array in real.items():
            assert array.dtype == bound[key].dtype, key
            assert array.ndim == len(bound[key].shape), key
            assert all(r <= b for r, b in zip(array.shape, bound[key].shape)), (key, array.shape)
        docs = "cand_memory" if cache else "enc_ids"
        assert real[docs].shape == bound[docs].shape  # documents are truncated to the bound
        assert real["query_ids"].shape == bound["query_ids"].shape


@needs_libtpu
def test_tiny_stages_1_and_3_compile_for_a_v5e_2x2_and_fit(tmp_path):
    out = tmp_path / "aot.json"
    proc = run_compile("--topology", "v5e:2x2", "--stages", "1,3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage1 on v5e:2x2 (4 devices, mesh data=4 fsdp=1 tensor=1): fits" in proc.stdout
    assert "stage3 on v5e:2x2 (4 devices, mesh data=4 fsdp=1 tensor=1): fits" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["stage"] for r in results] == ["stage1", "stage3"]
    for r in results:
        assert r["devices"] == 4 and r["hbm_bytes"] == 16 * 2**30 and r["fits"] is True
        assert r["argument_bytes"] > 0 and r["output_bytes"] > 0 and r["temp_bytes"] > 0
        assert r["total_bytes"] == (
            r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"] + r["code_bytes"]
        )
        assert 0 < r["total_bytes"] < r["hbm_bytes"] and r["compile_seconds"] > 0
    assert "query_ids" in results[1]["settings"]["batch_shapes"]
    assert "query_ids" not in results[0]["settings"]["batch_shapes"]


@needs_libtpu
def test_a_step_larger_than_the_hbm_fails_with_a_clear_message():
    proc = run_compile("--topology", "v5e:2x2", "--hbm-gib", "0.001")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stage1 on v5e:2x2 (4 devices, mesh data=4 fsdp=1 tensor=1): DOES NOT FIT" in proc.stdout
    assert (
        "stage1 on v5e:2x2: needs" in proc.stderr and "more than the 0.00 GiB of HBM per chip" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


@needs_libtpu
def test_a_step_the_compiler_cannot_place_in_hbm_is_reported_as_not_fitting():
    """An absurd batch (1024 sequences of 8192 tokens per micro-step): XLA itself gives up."""
    proc = run_compile(
        "--topology",
        "v5e:2x2",
        "--config.batch.global_size=1024",
        "--config.batch.micro_size=1024",
        "--gen-length",
        "8192",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stage1 on v5e:2x2 (4 devices, mesh data=4 fsdp=1 tensor=1): DOES NOT FIT" in proc.stdout
    assert "the TPU compiler ran out of HBM (RESOURCE_EXHAUSTED" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_libtpu
def test_a_mesh_that_does_not_match_the_topology_is_refused():
    proc = run_compile("--topology", "v5e:2x2", "--config.mesh=data=8,fsdp=1,tensor=1")
    assert proc.returncode == 2
    assert "mesh 'data=8,fsdp=1,tensor=1' does not fit topology v5e:2x2 (4 devices" in proc.stderr
    assert "Traceback" not in proc.stderr
