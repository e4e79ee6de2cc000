"""Stage 3 with candidates compressed once: the step sees the vectors it would have computed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clara_jax.data.pipeline import tokenize_retrieval
from clara_jax.data.sources import read_records
from clara_jax.data.synthetic import SyntheticCorpusConfig, write_corpus
from clara_jax.parallel.mesh import MeshConfig, make_mesh
from clara_jax.parallel.rules import parse_rules
from clara_jax.training.build import build_model
from clara_jax.training.candidate_cache import CandidateCache, reads_cached_candidates
from clara_jax.training.config import load_config
from clara_jax.training.objectives import candidate_memory, retrieval_loss
from clara_jax.training.run_spec import layout_config

CORPUS = SyntheticCorpusConfig(
    n_entities=40, n_distractors=0, n_candidates=8, n_hard_negatives=2, n_stage2_train=8,
    n_stage3_train=16, n_eval=8, docs_per_example=2,
)  # fmt: skip
SMALL = [
    "--config.data.candidates=8",
    "--config.clara.top_k=2",
    "--config.clara.doc_max_length=32",
    "--config.clara.generator_max_length=256",
    "--config.batch.global_size=4",
    "--config.batch.micro_size=4",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), CORPUS)


def test_only_a_frozen_compressor_stage_reads_cached_candidates():
    assert reads_cached_candidates(load_config("stage3_e2e:tiny,runlocal"))
    assert not reads_cached_candidates(
        load_config("stage3_e2e:tiny,runlocal", ["--config.data.cache_candidates=False"])
    )
    for module in ("stage1_scp", "stage2_instruct"):
        assert not reads_cached_candidates(load_config(f"{module}:tiny,runlocal"))


@pytest.mark.slow  # a tiny stage-3 model on an 8-device mesh, three programs: ~30 s on 2 cores
def test_cached_candidates_equal_the_steps_own_compression(corpus):
    # rows of each compressed chunk split over data x fsdp, weights over tensor
    config = load_config("stage3_e2e:tiny,runlocal", SMALL + ["--config.mesh=data=2,fsdp=2,tensor=2"])
    mesh = make_mesh(MeshConfig.from_spec(config.mesh))
    built = build_model(config, mesh)
    records, _ = read_records(str(corpus["stage3_train"]), "stage3")
    records = records[:6]
    with jax.set_mesh(mesh):
        cache = CandidateCache.build(
            built.model, built.tokenizer, built.clara, records, mesh, parse_rules(config.sharding_rules),
            candidates=8, chunk=5,  # rounded up to whole rows per device; the last chunk is padded
        )  # fmt: skip
    distinct = {d for r in records for d in r.docs[:8]}
    assert len(cache) == len(distinct) and cache.memory.shape[1:] == (
        built.clara.n_mem,
        built.model.config.hidden_size,
    )

    layout = layout_config(config)
    recompressed, stats = tokenize_retrieval(built.tokenizer, records, layout)
    cached, cached_stats = tokenize_retrieval(built.tokenizer, records, layout, candidate_memory=cache.lookup)
    assert "enc_ids" not in cached and cached["cand_memory"].shape == (
        6,
        8,
        built.clara.n_mem,
        built.model.config.hidden_size,
    )
    assert cached_stats == stats  # truncation counts survive the cache
    recompressed, cached = (jax.tree.map(jnp.asarray, a) for a in (recompressed, cached))
    own = np.asarray(nnx.jit(lambda m, b: candidate_memory(m, b, built.clara))(built.model, recompressed))
    np.testing.assert_allclose(cached["cand_memory"], own, rtol=1e-5, atol=1e-5)

    loss = nnx.jit(lambda m, b: retrieval_loss(m, b, built.clara, jax.random.key(0), train=False))
    loss_own, m_own = loss(built.model, recompressed)
    loss_cached, m_cached = loss(built.model, cached)
    np.testing.assert_allclose(float(loss_cached), float(loss_own), rtol=1e-5)
    assert float(m_cached["recall@1"]) == float(m_own["recall@1"])
