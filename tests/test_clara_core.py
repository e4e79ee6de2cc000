"""The method on a tiny model: roles, splicing, stage losses, gradients and the train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clara_jax.model.clara import ROLES, ClaraConfig, compress, encode_query, select_documents, splice
from clara_jax.training.objectives import (
    candidate_memory,
    compression_loss,
    recall_at,
    retrieval_loss,
    stage_loss_fn,
    token_cross_entropy,
)
from clara_jax.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from clara_jax.training.step import TrainState, make_train_step
from clara_jax.training.trainable import split_trainable
from tests import clara_fixtures as fx


def _grads(model, loss, adapters, embed_rows=True):
    # jitted: one compiled program, not hundreds of op-by-op dispatches (each compiled on first use)
    graphdef, trainable, frozen = split_trainable(model, adapters, embed_rows)
    return jax.jit(jax.grad(lambda t, f: loss(nnx.merge(graphdef, t, f))[0]))(trainable, frozen)


def _max_abs(tree):
    return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


def test_config_validation():
    with pytest.raises(ValueError, match="n_mem"):
        ClaraConfig(mem_token_ids=(1, 2, 3), doc_max_length=16, compression_rate=4)
    with pytest.raises(ValueError, match="consecutive"):
        ClaraConfig(mem_token_ids=(1, 2, 4, 5), doc_max_length=16, compression_rate=4)
    with pytest.raises(ValueError, match="compression_rate"):
        ClaraConfig(mem_token_ids=(), doc_max_length=16, compression_rate=0)
    assert fx.clara_config().n_mem == 4


@pytest.mark.slow
def test_compression_is_independent_of_padding_bucket():
    """Bucketed (short) padding gives the same memory vectors and MSE as full padding."""
    model = fx.tiny_clara()
    ids, mask = fx.encoder_rows(np.random.default_rng(0), 3, 10)
    pad = 22  # the same documents padded much further on the left
    wide_ids = np.concatenate([np.zeros((3, pad), np.int32), ids], 1)
    wide_mask = np.concatenate([np.zeros((3, pad), bool), mask], 1)
    mem_a, mse_a = compress(model, jnp.asarray(ids), jnp.asarray(mask), fx.N_MEM)
    mem_b, mse_b = compress(model, jnp.asarray(wide_ids), jnp.asarray(wide_mask), fx.N_MEM)
    assert mem_a.shape == (3, fx.N_MEM, 64)
    np.testing.assert_allclose(mem_a, mem_b, atol=2e-5)
    np.testing.assert_allclose(mse_a, mse_b, rtol=1e-5)


@pytest.mark.slow
def test_mse_matches_its_definition():
    model = fx.tiny_clara()
    ids, mask = fx.encoder_rows(np.random.default_rng(1), 2, 10)
    _, mse = compress(model, jnp.asarray(ids), jnp.asarray(mask), fx.N_MEM)
    hidden = np.asarray(
        model.hidden_states(jnp.asarray(ids), attention_mask=jnp.asarray(mask), adapter="compressor")
    )
    diffs = []
    for r in range(2):
        text = hidden[r][mask[r] & ~np.isin(ids[r], fx.MEM)]
        diffs.append(text.mean(0) - hidden[r, -fx.N_MEM :].mean(0))
    np.testing.assert_allclose(float(mse), np.mean(np.square(diffs)), rtol=1e-5)


@pytest.mark.slow
def test_query_reasoner_uses_its_own_adapter():
    model = fx.tiny_clara()
    ids, mask = fx.encoder_rows(np.random.default_rng(2), 2, 8)
    q = encode_query(model, jnp.asarray(ids), jnp.asarray(mask), fx.N_MEM)
    c, _ = compress(model, jnp.asarray(ids), jnp.asarray(mask), fx.N_MEM)
    assert q.shape == (2, fx.N_MEM * 64)
    assert np.abs(np.asarray(q) - np.asarray(c).reshape(2, -1)).max() > 1e-3


@pytest.mark.slow
def test_splice_writes_documents_in_order_and_keeps_sep():
    model = fx.tiny_clara()
    batch = fx.generator_rows(np.random.default_rng(3), 2, 3)
    ids = jnp.asarray(batch["gen_ids"])
    memory = jax.random.normal(jax.random.key(0), (2, 3, fx.N_MEM, 64))
    out = np.asarray(splice(model, ids, memory, fx.MEM))
    base = np.asarray(model.embed_tokens(ids))
    for r in range(2):
        starts = np.flatnonzero(np.asarray(ids[r]) == fx.MEM[0])
        assert len(starts) == 3
        for doc, s in enumerate(starts):
            np.testing.assert_allclose(out[r, s : s + fx.N_MEM], np.asarray(memory[r, doc]), atol=1e-6)
            np.testing.assert_array_equal(out[r, s + fx.N_MEM], base[r, s + fx.N_MEM])  # <SEP>
        other = ~np.isin(np.asarray(ids[r]), fx.MEM)
        np.testing.assert_array_equal(out[r][other], base[r][other])


def test_cross_entropy_and_recall_definitions():
    logits = jnp.log(jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]))
    targets = jnp.asarray([[0, 1, 2]])
    ce, acc, n = token_cross_entropy(logits, targets, jnp.asarray([[True, True, False]]))
    np.testing.assert_allclose(ce, -(np.log(0.7) + np.log(0.1)) / 2, rtol=1e-6)
    assert float(acc) == 0.5 and float(n) == 2
    indices = jnp.asarray([[0, 2, 1], [1, 3, 0], [0, 1, 2]])
    positives = jnp.asarray(
        [[True, True, False, False], [False, False, False, False], [False, False, True, False]]
    )
    # per question R@1: 1/2, 0 (no gold: counted as 0), 0; R@3: 2/2, 0, 1/1
    np.testing.assert_allclose(recall_at(indices, positives, 1), (0.5 + 0 + 0) / 3)
    np.testing.assert_allclose(recall_at(indices, positives, 3), (1 + 0 + 1) / 3)
    np.testing.assert_allclose(recall_at(jnp.asarray([[-1, 0]]), jnp.asarray([[True, False]]), 2), 1.0)


@pytest.mark.slow
def test_stage1_gradients_reach_compressor_rows_and_generator():
    model = fx.tiny_clara()
    cfg = fx.clara_config()
    batch = fx.stage12_batch()
    grads = _grads(
        model, lambda m: compression_loss(m, batch, cfg, jax.random.key(0), docs_per_example=1), ROLES
    )
    assert _max_abs(grads["adapters"]["compressor"]) > 1e-4
    assert _max_abs(grads["adapters"]["generator"]) > 1e-4
    assert float(jnp.abs(grads["embed_rows"][...]).sum(1).min()) > 0  # every <MEM> row learns
    assert _max_abs(grads["adapters"]["query_reasoner"]) == 0.0


@pytest.mark.slow
def test_stage2_splices_k_documents():
    model = fx.tiny_clara()
    cfg = fx.clara_config()
    batch = fx.stage12_batch(k=3)
    loss, metrics = compression_loss(model, batch, cfg, jax.random.key(0), docs_per_example=3)
    assert np.isfinite(float(loss)) and float(metrics["mse"]) > 0
    # the answer depends on every spliced document: perturb the last one only
    ids = np.asarray(batch["enc_ids"]).copy()
    ids[2::3, -fx.N_MEM - 3] = 7
    changed = compression_loss(
        model, dict(batch, enc_ids=jnp.asarray(ids)), cfg, jax.random.key(0), docs_per_example=3
    )[0]
    assert abs(float(changed) - float(loss)) > 1e-6


@pytest.mark.slow
def test_stage3_gradient_reaches_query_reasoner_only_through_topk():
    model = fx.tiny_clara()
    cfg = fx.clara_config()
    batch = fx.stage3_batch()
    grads = _grads(model, lambda m: retrieval_loss(m, batch, cfg, jax.random.key(0)), ROLES, embed_rows=False)
    assert _max_abs(grads["adapters"]["query_reasoner"]) > 1e-6
    assert _max_abs(grads["adapters"]["generator"]) > 1e-4
    assert _max_abs(grads["adapters"]["compressor"]) == 0.0  # exactly zero, not merely small

    # cut the straight-through path: the query reasoner then gets nothing at all
    import clara_jax.training.objectives as objectives

    original = objectives.select_documents
    objectives.select_documents = lambda w, mem: original(jax.lax.stop_gradient(w), mem)
    try:
        cut = _grads(
            model, lambda m: retrieval_loss(m, batch, cfg, jax.random.key(0)), ROLES, embed_rows=False
        )
    finally:
        objectives.select_documents = original
    assert _max_abs(cut["adapters"]["query_reasoner"]) == 0.0


@pytest.mark.slow
def test_stage3_cached_embeddings_equal_recompression():
    model = fx.tiny_clara()
    cfg = fx.clara_config()
    batch = fx.stage3_batch(seed=4)
    cached = dict(batch, cand_memory=candidate_memory(model, batch, cfg))
    del cached["enc_ids"], cached["enc_mask"]
    key = jax.random.key(1)
    loss_a, m_a = retrieval_loss(model, batch, cfg, key)
    loss_b, m_b = retrieval_loss(model, cached, cfg, key)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert float(m_a["recall@2"]) == float(m_b["recall@2"])
    adapters = ["query_reasoner", "generator"]
    g_a = _grads(model, lambda m: retrieval_loss(m, batch, cfg, key), adapters, embed_rows=False)
    g_b = _grads(model, lambda m: retrieval_loss(m, cached, cfg, key), adapters, embed_rows=False)
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_select_documents_forward_is_exact_topk():
    memory = jax.random.normal(jax.random.key(0), (2, 5, fx.N_MEM, 8))
    weights = jax.nn.one_hot(jnp.asarray([[3, 1], [0, 4]]), 5)
    out = select_documents(weights, memory)
    np.testing.assert_array_equal(out[0, 0], memory[0, 3])
    np.testing.assert_array_equal(out[1, 1], memory[1, 4])


def test_schedule_follows_hf_semantics():
    sched = learning_rate_schedule(OptimizerConfig(learning_rate=1e-4, total_steps=100))
    assert float(sched(0)) == 0.0  # the first update runs at lr 0, as in the official logs
    np.testing.assert_allclose(float(sched(3)), 1e-4, rtol=1e-6)  # ceil(3 % of 100) warm-up steps
    np.testing.assert_allclose(float(sched(100)), 1e-5, rtol=1e-5)  # cosine down to 10 %
    const = learning_rate_schedule(OptimizerConfig(learning_rate=5e-6, schedule="constant"))
    assert float(const(0)) == float(const(50)) == 5e-6


def _stack(batches):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


@pytest.mark.slow
def test_gradient_accumulation_averages_micro_batches():
    model = fx.tiny_clara()
    cfg = fx.clara_config()
    loss_fn = stage_loss_fn("stage1", cfg)
    graphdef, trainable, frozen = split_trainable(model, ["compressor", "generator"])
    micro = [fx.stage12_batch(seed=s) for s in (1, 2)]
    tx = optax.sgd(1.0)  # update = -mean gradient, so the new params reveal the gradient used
    step = jax.jit(make_train_step(graphdef, loss_fn, tx))
    state = TrainState.create(trainable, tx, jax.random.key(0))
    new_state, metrics = step(state, frozen, _stack(micro))
    step_rng = jax.random.split(jax.random.key(0))[1]
    grad = jax.jit(jax.grad(lambda t, b, key: loss_fn(nnx.merge(graphdef, t, frozen), b, key)[0]))
    per_micro = [grad(trainable, b, jax.random.fold_in(step_rng, i)) for i, b in enumerate(micro)]
    expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, trainable, *per_micro)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert int(new_state.step) == 1 and set(metrics) >= {"loss", "ce", "mse", "grad_norm"}


@pytest.mark.slow
def test_simple_synthetic_task_loss_falls():
    """Stage 1 on 'repeat the document': only the memory vectors carry the answer."""
    rng = np.random.default_rng(0)
    model = fx.tiny_clara(perturb=False)
    model.lm_head[...] = (
        model.lm_head[...] * 20.0
    )  # a random init's logits are too flat to learn from quickly
    cfg = fx.clara_config()

    def make_batch():
        docs = rng.integers(3, 40, (4, 5)).astype(np.int32)
        enc = np.concatenate(
            [
                np.full((4, 1), fx.ENC),
                np.full((4, 1), fx.BOS),
                docs,
                np.full((4, 1), fx.EOS),
                np.tile(fx.MEM, (4, 1)),
            ],
            1,
        )
        gen = np.concatenate(
            [np.full((4, 1), fx.BOS), np.tile([*fx.MEM, fx.SEP], (4, 1)), docs, np.full((4, 1), fx.EOS)], 1
        )
        target_mask = np.zeros(gen.shape, bool)
        target_mask[:, fx.N_MEM + 1 : -1] = True  # predict doc tokens and </s>
        targets = np.concatenate([gen[:, 1:], np.zeros((4, 1), np.int32)], 1)
        return dict(
            enc_ids=enc,
            enc_mask=np.ones(enc.shape, bool),
            gen_ids=gen,
            gen_mask=np.ones(gen.shape, bool),
            targets=targets,
            target_mask=target_mask,
        )

    graphdef, trainable, frozen = split_trainable(model, ["compressor", "generator"])
    opt = OptimizerConfig(learning_rate=1e-2, total_steps=60, warmup_ratio=0.0)
    tx = make_optimizer(opt)
    step = jax.jit(
        make_train_step(graphdef, stage_loss_fn("stage1", cfg), tx, learning_rate_schedule(opt)),
        donate_argnums=0,
    )
    state = TrainState.create(trainable, tx, jax.random.key(0))
    losses = []
    for _ in range(60):
        state, metrics = step(state, frozen, _stack([jax.tree.map(jnp.asarray, make_batch())]))
        losses.append(float(metrics["ce"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.75 * first, (first, last)


@pytest.mark.slow
def test_candidate_dropout_is_the_official_switch_and_keeps_the_compressor_frozen():
    """candidate_dropout compresses candidates with LoRA dropout (official train mode, no gradient);
    off, they are deterministic (what the candidate cache needs)."""
    from clara_jax.training.objectives import candidate_memory

    model, cfg, batch = fx.tiny_clara(dropout=0.3), fx.clara_config(), fx.stage3_batch()
    memory = nnx.jit(lambda m, key: candidate_memory(m, batch, cfg, dropout_rng=key))
    plain = candidate_memory(model, batch, cfg)
    dropped = [memory(model, jax.random.key(s)) for s in (1, 2)]
    assert not np.allclose(dropped[0], plain) and not np.allclose(dropped[0], dropped[1])

    graphdef, trainable, frozen = split_trainable(model, ROLES, False)

    @functools.partial(jax.jit, static_argnums=2)
    def loss_and_grads(t, f, flag):  # one compiled program per flag, not op-by-op dispatches
        def loss(t):
            m = nnx.merge(graphdef, t, f)
            return retrieval_loss(m, batch, cfg, jax.random.key(0), candidate_dropout=flag)[0]

        return jax.value_and_grad(loss)(t)

    (base, _), (with_dropout, grads) = (loss_and_grads(trainable, frozen, flag) for flag in (False, True))
    assert float(base) != float(with_dropout)
    default = jax.jit(
        lambda t, f: retrieval_loss(nnx.merge(graphdef, t, f), batch, cfg, jax.random.key(0))[0]
    )
    assert float(base) == float(default(trainable, frozen))  # the switch off = the path without it
    assert _max_abs(grads["adapters"]["compressor"]) == 0.0  # still frozen, dropout or not
    assert _max_abs(grads["adapters"]["query_reasoner"]) > 1e-6
    with pytest.raises(ValueError, match="cached candidates"):
        candidate_memory(model, {**batch, "cand_memory": plain}, cfg, dropout_rng=jax.random.key(1))
