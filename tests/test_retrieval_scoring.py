"""Stage-3 scoring options (issue #15): the dot-product ("MIPS") score beside cosine, and the
supervised-retriever InfoNCE loss beside the generator's CE.

Gradients are checked against hand-derived formulas in float64 numpy on tiny random inputs.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.model.clara import ClaraConfig, compress, encode_query
from clara_jax.model.field_checks import SettingsError
from clara_jax.model.topk import (
    OFFICIAL_TEMPERATURE,
    cosine_scores,
    differentiable_topk,
    dot_scores,
    retrieval_scores,
)
from clara_jax.training.objectives import infonce_loss, retrieval_loss
from clara_jax.training.run_spec import ClaraSettings
from tests.clara_fixtures import MEM, N_MEM, clara_config, stage3_batch, tiny_clara


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _cosine_np(q, c):
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=-1, keepdims=True)
    return np.einsum("bd,bnd->bn", qn, cn)


def _cosine_vjp_q(q, c, g):
    """d/dq of sum_n g_n cos(q, c_n) = (I - q̂ q̂ᵀ)/|q| · sum_n g_n ĉ_n, per row."""
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    qh = q / norm
    v = np.einsum("bn,bnd->bd", g, c / np.linalg.norm(c, axis=-1, keepdims=True))
    return (v - qh * np.sum(qh * v, axis=-1, keepdims=True)) / norm


# --------------------------------------------------------------------------------------------
# Dot-product scores.


def test_dot_scores_value_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6)).astype(np.float32)
    c = rng.normal(size=(2, 5, 6)).astype(np.float32)
    r = rng.normal(size=(2, 5)).astype(np.float32)
    got = dot_scores(q, c)
    assert got.dtype == jnp.float32 and got.shape == (2, 5)
    np.testing.assert_allclose(np.asarray(got), np.einsum("bd,bnd->bn", q, c), rtol=1e-6, atol=1e-6)
    gq, gc = jax.grad(lambda a, b: jnp.sum(r * dot_scores(a, b)), argnums=(0, 1))(q, c)
    np.testing.assert_allclose(np.asarray(gq), np.einsum("bn,bnd->bd", r, c), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gc), r[:, :, None] * q[:, None, :], rtol=1e-5, atol=1e-6)
    # the dispatcher: the same functions, and a clear error for anything else
    np.testing.assert_array_equal(np.asarray(retrieval_scores(q, c, "dot")), np.asarray(got))
    np.testing.assert_array_equal(np.asarray(retrieval_scores(q, c)), np.asarray(cosine_scores(q, c)))
    with pytest.raises(ValueError, match=r"score must be one of \('cosine', 'dot'\), got 'l2'"):
        retrieval_scores(q, c, "l2")
    # unlike cosine, the dot product sees the vectors' norms: doubling one candidate moves its score
    c2 = c.copy()
    c2[0, 1] *= 2
    assert np.isclose(float(dot_scores(q, c2)[0, 1]), 2 * float(got[0, 1]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cosine_scores(q, c2)), np.asarray(cosine_scores(q, c)), atol=1e-6)


def _topk_score_grad_np(scores, idx, g, tau):
    """The ST top-k's d/dscores for the exact mask: (1/tau) sum_j p_j (G_j - <p_j, G_j>), p_j the
    softmax of scores/tau over the candidates not taken by slots < j."""
    b, n = scores.shape
    out = np.zeros_like(scores)
    for i in range(b):
        taken = np.zeros(n, bool)
        for j in range(idx.shape[1]):
            logits = np.where(taken, -np.inf, scores[i] / tau)
            p = _softmax(logits)
            out[i] += p * (g[i, j] - np.dot(p, g[i, j])) / tau
            taken[idx[i, j]] = True
    return out


def test_dot_branch_topk_gradient_matches_the_formula():
    """Official MIPS training branch: raw dot scores, top-k at tau = 1 (modeling_clara.py L1436).
    d loss / d scores and d loss / d query against the hand-written formula."""
    rng = np.random.default_rng(1)
    b, n, d, k = 2, 6, 8, 3
    tau = OFFICIAL_TEMPERATURE["dot"]
    assert tau == 1.0
    q = (0.4 * rng.normal(size=(b, d))).astype(np.float32)  # small: logits of order 1, no saturation
    c = (0.4 * rng.normal(size=(b, n, d))).astype(np.float32)
    m = rng.normal(size=(b, n, 3)).astype(np.float32)  # what the selected slots carry
    v = rng.normal(size=(b, k, 3)).astype(np.float32)  # d loss / d selected

    def loss(query):
        w, _ = differentiable_topk(dot_scores(query, c), k, tau)
        return jnp.sum(jnp.einsum("bkn,bnd->bkd", w, m) * v)

    _, idx = differentiable_topk(dot_scores(q, c), k, tau)
    idx = np.asarray(idx)
    s = np.einsum("bd,bnd->bn", q, c).astype(np.float64)
    np.testing.assert_array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :k])
    g = np.einsum("bkd,bnd->bkn", v, m).astype(np.float64)  # G_{j,n} = <dL/dsel_j, M_n>
    ds = _topk_score_grad_np(s, idx, g, tau)
    got_ds = jax.grad(
        lambda sc: jnp.sum(jnp.einsum("bkn,bnd->bkd", differentiable_topk(sc, k, tau)[0], m) * v)
    )(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(np.asarray(got_ds), ds, rtol=1e-4, atol=1e-5)
    got_dq = jax.grad(loss)(q)
    np.testing.assert_allclose(np.asarray(got_dq), np.einsum("bn,bnd->bd", ds, c), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# InfoNCE.


def _infonce_np(scores, positives, valid, tau):
    """Reference value and d/dscores: per labelled question, -log sum_{p in P} softmax_V(s/tau)_p,
    averaged over labelled questions; d/ds_n = (softmax_V - softmax_P)_n / tau / n_labelled."""
    pos = positives & valid
    labelled = pos.any(axis=1)
    n_lab = max(int(labelled.sum()), 1)
    loss, grad = 0.0, np.zeros_like(scores)
    for i in np.nonzero(labelled)[0]:
        logits = scores[i] / tau
        p_all = _softmax(np.where(valid[i], logits, -np.inf))
        p_pos = _softmax(np.where(pos[i], logits, -np.inf))
        loss += -np.log(p_all[pos[i]].sum())
        grad[i] = (p_all - p_pos) / tau / n_lab
    return loss / n_lab, grad


def _infonce_case():
    rng = np.random.default_rng(2)
    scores = rng.uniform(-1, 1, size=(4, 5))
    valid = np.ones((4, 5), bool)
    valid[1, 3:] = False  # two padded candidates
    positives = np.zeros((4, 5), bool)
    positives[0, [1, 3]] = True  # two gold documents: they share one softmax
    positives[1, [0, 4]] = True  # gold index 4 is a padded slot: only 0 counts
    positives[3, 2] = True  # row 2: no gold at all (left out of the mean)
    return scores, positives, valid


@pytest.mark.parametrize("tau", [0.02, 1.0])
def test_infonce_value_and_score_gradient_match_the_formula(tau):
    scores, positives, valid = _infonce_case()
    ref_loss, ref_grad = _infonce_np(scores, positives, valid, tau)
    s = jnp.asarray(scores, jnp.float32)
    (loss, n), grad = jax.value_and_grad(infonce_loss, has_aux=True)(s, positives, valid, tau)
    assert float(n) == 3
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[1, 3:] == 0) and np.all(np.asarray(grad)[2] == 0)
    # the official formula, literally: -(logsumexp(logits[pos]) - logsumexp(logits)), mean over rows
    # with a positive (L1500-1508; the official candidates are never padded, so take rows 0, 3)
    logits = scores / tau
    official = []
    for i in (0, 3):
        lse_pos = np.log(np.exp(logits[i][positives[i]]).sum())
        official.append(-(lse_pos - np.log(np.exp(logits[i]).sum())))
    rows = np.array([0, 3])
    got_rows = infonce_loss(scores[rows], positives[rows], valid[rows], tau)[0]
    np.testing.assert_allclose(float(got_rows), np.mean(official), rtol=1e-5)


def test_infonce_without_any_gold_is_zero_not_nan():
    s = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4)), jnp.float32)
    none = np.zeros((2, 4), bool)
    (loss, n), grad = jax.value_and_grad(infonce_loss, has_aux=True)(s, none, np.ones((2, 4), bool), 0.02)
    assert float(loss) == 0.0 and float(n) == 0 and np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_infonce_query_gradient_matches_the_formula(score):
    """d InfoNCE / d query vectors through each score function, against the chain rule by hand."""
    rng = np.random.default_rng(4)
    b, n, d = 4, 5, 6
    tau = OFFICIAL_TEMPERATURE[score]
    q = (0.5 * rng.normal(size=(b, d))).astype(np.float32)
    c = (0.5 * rng.normal(size=(b, n, d))).astype(np.float32)
    _, positives, valid = _infonce_case()
    qd, cd = q.astype(np.float64), c.astype(np.float64)
    s = _cosine_np(qd, cd) if score == "cosine" else np.einsum("bd,bnd->bn", qd, cd)
    _, ds = _infonce_np(s, positives, valid, tau)
    want = _cosine_vjp_q(qd, cd, ds) if score == "cosine" else np.einsum("bn,bnd->bd", ds, cd)
    got = jax.grad(lambda x: infonce_loss(retrieval_scores(x, c, score), positives, valid, tau)[0])(q)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The stage-3 loss on a tiny model.


@pytest.mark.slow
def test_stage3_loss_modes_on_the_tiny_model():
    """With "lm+infonce" the loss adds the weighted InfoNCE of the model's own scores to the CE; "infonce" is
    that term alone, with no generator pass (candidates cached, so no compression in the loss)."""
    model = tiny_clara()
    batch = stage3_batch()
    batch["positives"] = batch["positives"].at[0, :2].set(True)  # question 0: several gold documents
    memory = jax.jit(lambda ids, mask: compress(model, ids, mask, N_MEM)[0])(
        batch["enc_ids"], batch["enc_mask"]
    )
    batch = {k: v for k, v in batch.items() if k not in ("enc_ids", "enc_mask")}
    batch["cand_memory"] = memory.reshape(2, 5, N_MEM, -1)
    query = jax.jit(lambda ids, mask: encode_query(model, ids, mask, N_MEM))(
        batch["query_ids"], batch["query_mask"]
    )
    ref, _ = infonce_loss(
        dot_scores(query, memory.reshape(2, 5, -1)), batch["positives"], batch["cand_valid"], 1.0
    )

    def run(**kw):
        cfg = clara_config(retrieval_score="dot", temperature=1.0, **kw)
        return jax.jit(lambda b: retrieval_loss(model, b, cfg, jax.random.key(0), train=False))(batch)

    both, m_both = run(retrieval_loss="lm+infonce", infonce_weight=0.5)
    np.testing.assert_allclose(float(m_both["infonce"]), float(ref), rtol=1e-5)
    np.testing.assert_allclose(float(both), float(m_both["ce"]) + 0.5 * float(ref), rtol=1e-5)
    nce, m_nce = run(retrieval_loss="infonce")
    assert "ce" not in m_nce and float(m_nce["infonce_questions"]) == 2
    np.testing.assert_allclose(float(nce), float(ref), rtol=1e-5)
    assert np.isfinite(float(both)) and float(ref) > 0


# --------------------------------------------------------------------------------------------
# Settings.


def test_bad_scoring_settings_are_refused():
    with pytest.raises(SettingsError) as err:
        ClaraSettings(retrieval_score="mips", retrieval_loss="ce", infonce_weight=0.0)
    assert err.value.problems == (
        "clara.retrieval_score = 'mips': expected one of ('cosine', 'dot')",
        "clara.retrieval_loss = 'ce': expected one of ('lm', 'infonce', 'lm+infonce')",
        "clara.infonce_weight = 0.0: expected > 0",
    )
    ok = ClaraSettings(retrieval_score="dot", retrieval_loss="lm+infonce", infonce_weight=0.25)
    cfg = ok.model_config(tuple(range(100, 100 + ok.n_mem)))
    assert (cfg.retrieval_score, cfg.retrieval_loss, cfg.infonce_weight) == ("dot", "lm+infonce", 0.25)
    for kw, match in [
        ({"retrieval_score": "l2"}, "retrieval_score"),
        ({"retrieval_loss": "nce"}, "retrieval_loss"),
        ({"infonce_weight": -1.0}, "infonce_weight"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClaraConfig(mem_token_ids=MEM, doc_max_length=16, compression_rate=4, **kw)


def test_run_config_defaults_and_overrides():
    from clara_jax.training.config import ConfigError, load_config

    c = load_config("stage3_e2e:tiny")
    assert (c.clara.retrieval_score, c.clara.retrieval_loss, c.clara.infonce_weight) == ("cosine", "lm", 1.0)
    c = load_config(
        "stage3_e2e:tiny",
        [
            "--config.clara.retrieval_score=dot",
            "--config.clara.retrieval_loss=infonce",
            "--config.clara.temperature=1.0",
        ],
    )
    assert (c.clara.retrieval_score, c.clara.retrieval_loss) == ("dot", "infonce")
    with pytest.raises(ConfigError, match="clara.retrieval_loss = 'sup': expected one of"):
        load_config("stage3_e2e:tiny", ["--config.clara.retrieval_loss=sup"])


# --------------------------------------------------------------------------------------------
# Inference ranks by the model's score; the model directory keeps it.


def _index(tmp_path, vectors, shard_size):
    """An export directory written by hand (the format of clara_jax.inference.export)."""
    from clara_jax.inference.export import FORMAT, FORMAT_VERSION, encode_shard, shard_name

    shards = []
    for i, start in enumerate(range(0, len(vectors), shard_size)):
        part = vectors[start : start + shard_size]
        data = encode_shard(part, [f"d{start + j}" for j in range(len(part))], start, "float32")
        (tmp_path / shard_name(i)).write_bytes(data)
        shards.append(
            {
                "file": shard_name(i),
                "start": start,
                "count": len(part),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "count": len(vectors),
        "shard_size": shard_size,
        "num_shards": len(shards),
        "shards": shards,
        "n_mem": vectors.shape[1],
        "hidden_size": vectors.shape[2],
        "embedding_shape": list(vectors.shape[1:]),
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))


def test_index_search_by_dot_product(tmp_path):
    from clara_jax.inference.index import EmbeddingIndex

    rng = np.random.default_rng(5)
    docs = rng.normal(size=(7, 2, 3)).astype(np.float32)
    docs *= rng.uniform(0.2, 3.0, size=(7, 1, 1)).astype(np.float32)  # norms differ: dot != cosine
    _index(tmp_path, docs, shard_size=3)
    index = EmbeddingIndex.open(tmp_path)
    q = rng.normal(size=(4, 6)).astype(np.float32)
    flat = docs.reshape(7, -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
    for score, ref in [("dot", q @ flat.T), ("cosine", cos)]:
        ids, scores = index.search(q, k=3, score=score)
        want = np.argsort(-ref, axis=1, kind="stable")[:, :3]
        assert ids == [[f"d{j}" for j in row] for row in want], score
        np.testing.assert_allclose(scores, np.take_along_axis(ref, want, 1), rtol=1e-5, atol=1e-6)
    dot_ids, _ = index.search(q, k=3, score="dot")
    cos_ids, _ = index.search(q, k=3)
    assert dot_ids != cos_ids  # the scaled norms change the ranking: the option is not a no-op
    with pytest.raises(ValueError, match="score must be one of"):
        index.search(q, k=3, score="l2")
    pytest.importorskip("faiss")
    for score in ("dot", "cosine", "dot"):  # the FAISS index is rebuilt when the score changes
        ids, scores = index.search(q, k=3, score=score, backend="faiss")
        want_ids, want_scores = index.search(q, k=3, score=score)
        assert ids == want_ids, score
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_model_dir_keeps_the_scoring_settings_and_rerank_uses_them(tmp_path):
    from flax import nnx

    from clara_jax.data.tiny_tokenizer import TINY_TOKENIZER_DIR
    from clara_jax.data.tokenizer import load_tokenizer
    from clara_jax.inference.clara_model import ClaraInference
    from clara_jax.interop.model_dir import load_clara_model, save_clara_model
    from clara_jax.model.config import tiny_config
    from clara_jax.model.decoder import Decoder
    from clara_jax.model.factory import add_clara_parts
    from clara_jax.model.lora import LoRAConfig

    tok = load_tokenizer(TINY_TOKENIZER_DIR, n_mem=4)
    model = Decoder(tiny_config(vocab_size=tok.base_vocab_size), rngs=nnx.Rngs(0))
    add_clara_parts(
        model,
        vocab_size=tok.vocab_size,
        mem_token_ids=tok.mem_token_ids,
        lora=LoRAConfig(rank=4, alpha=8),
        seed=0,
    )
    clara = ClaraConfig(
        mem_token_ids=tok.mem_token_ids,
        doc_max_length=32,
        compression_rate=8,
        top_k=2,
        retrieval_score="dot",
        retrieval_loss="lm+infonce",
        infonce_weight=0.5,
    )
    out = tmp_path / "m"
    save_clara_model(model, tok, clara, str(out))
    _, _, clara2 = load_clara_model(str(out))
    assert clara2 == clara
    # a directory written before these settings existed loads with the then only behaviour
    meta = json.loads((out / "clara.json").read_text())
    for key in ("retrieval_score", "retrieval_loss", "infonce_weight"):
        del meta["clara"][key]
    (out / "clara.json").write_text(json.dumps(meta))
    _, _, old = load_clara_model(str(out))
    assert (old.retrieval_score, old.retrieval_loss, old.infonce_weight) == ("cosine", "lm", 1.0)

    inference = ClaraInference(tok, model, clara, batch_size=2, data_parallel=False)
    queries = inference.encode_queries(["Where?", "Who?"])
    rng = np.random.default_rng(6)
    memory = rng.normal(size=(2, 5, 4, queries.shape[1] // 4)).astype(np.float32)
    memory *= rng.uniform(0.2, 3.0, size=(2, 5, 1, 1)).astype(np.float32)
    topk, _ = inference.rerank(["Where?", "Who?"], candidate_memory=memory, k=3)
    dots = np.einsum("bd,bnd->bn", queries, memory.reshape(2, 5, -1))
    np.testing.assert_array_equal(topk, np.argsort(-dots, axis=1, kind="stable")[:, :3])
