"""Tests for the stage-3 straight-through top-k (clara_jax.model.topk)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.model.topk import cosine_scores, differentiable_topk, slot_distributions

# (N, k) grid of the parity test; k <= N.
GRID = [(n, k) for n in (5, 20, 100) for k in (1, 5, 10) if k <= n]
TAUS = (0.02, 1.0)

# Eager JAX dispatches op by op and is slow on CPU; most checks run through these jitted wrappers
# (temperature traced, so both taus share a compilation). test_jit_matches_eager pins jit == eager.
_topk = jax.jit(differentiable_topk, static_argnames=("k", "mask_mode"))


@functools.partial(jax.jit, static_argnames=("k", "mask_mode"))
def _linear_grad(s, r, tau, *, k, mask_mode="exact", valid_mask=None, key=None):
    """Gradient w.r.t. scores of the random linear functional sum(W * r)."""

    def loss(x):
        w, _ = differentiable_topk(x, k, tau, mask_mode=mask_mode, valid_mask=valid_mask, key=key)
        return jnp.sum(w * r)

    return jax.grad(loss)(s)


def _scores(rng, b, n):
    """Cosine-like float32 scores in [-1, 1]."""
    return rng.uniform(-1.0, 1.0, size=(b, n)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# 1. Forward value is exactly the hard top-k.


@pytest.mark.slow
@pytest.mark.parametrize("mask_mode", ["exact", "official"])
def test_forward_is_hard_topk(mask_mode):
    rng = np.random.default_rng(0)
    for n, k in GRID:
        s = _scores(rng, 4, n)
        for tau in TAUS:
            w, idx = _topk(s, k=k, temperature=tau, mask_mode=mask_mode)
            assert w.dtype == jnp.float32 and w.shape == (4, k, n)
            assert idx.dtype == jnp.int32 and idx.shape == (4, k)
            ref_idx = np.asarray(jax.lax.top_k(jnp.asarray(s), k)[1])
            np.testing.assert_array_equal(np.asarray(idx), ref_idx)
            # Bit-exact one-hot, not merely close.
            np.testing.assert_array_equal(np.asarray(w), np.asarray(jax.nn.one_hot(ref_idx, n)))


def test_ties_pick_lower_index_first_and_low_precision_input():
    s = jnp.array([[0.5, 0.7, 0.5, 0.7, 0.1]], dtype=jnp.bfloat16)
    w, idx = differentiable_topk(s, 4, 0.02)
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(idx), [[1, 3, 0, 2]])


# --------------------------------------------------------------------------------------------
# 2. mask_mode="official" matches a PyTorch transcription of the official function.


def _torch_official_topk(torch, logits, k, temperature=1.0):
    """Transcription of apple/ml-clara openrlhf/models/modeling_clara.py differentiable_topk."""
    F = torch.nn.functional
    B, N = logits.shape
    perturbed = logits / max(temperature, 1e-6)
    _, topk_idx = perturbed.topk(k, dim=-1)
    K_hard = torch.zeros(B, k, N, dtype=logits.dtype)
    K_hard.scatter_(2, topk_idx.unsqueeze(-1), 1.0)
    K_soft = torch.zeros_like(K_hard)
    taken = torch.zeros(B, N, dtype=logits.dtype)
    for j in range(k):
        mask = 1.0 - taken.detach()
        masked = perturbed + (mask + 1e-8).log()
        pj = F.softmax(masked, dim=-1).float()
        K_soft[:, j, :] = pj
        taken = torch.clamp(taken + K_hard[:, j, :], max=1.0)
    W = K_hard + (K_soft - K_soft.detach())
    return W, topk_idx


# Gradient tolerance. At tau=0.02 the logits s/tau reach +-50 and float32 carries them with an
# absolute error of ~ulp(50) ~ 4e-6, so any float32 implementation (JAX or torch) has a gradient
# error of a few 1e-6 *relative to the gradient's own scale* (which is ~1/tau = 50x larger than at
# tau=1). An absolute 1e-5 would be meaningless there, so we use
#   atol = GRAD_TOL * max(1, max|g_ref|)
# i.e. 1e-5 absolute at tau=1 and 1e-5 relative to the largest gradient entry at tau=0.02.
GRAD_TOL = 1e-5


@functools.partial(jax.jit, static_argnames=("k",))
def _official_jax(s, r, m, q, tau, *, k):
    """W, indices and the gradients of a linear functional and of a selection loss."""
    topk = functools.partial(differentiable_topk, k=k, temperature=tau, mask_mode="official")
    w, idx = topk(s)
    g_lin = jax.grad(lambda x: jnp.sum(topk(x)[0] * r))(s)
    g_sel = jax.grad(lambda x: jnp.sum(jnp.einsum("bkn,bnd->bkd", topk(x)[0], m) * q))(s)
    return w, idx, g_lin, g_sel


@pytest.mark.slow
@pytest.mark.parametrize("torch_dtype", ["float32", "float64"])
def test_official_mode_matches_torch(torch_dtype):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, torch_dtype)
    rng = np.random.default_rng(1)
    b, d = 4, 8
    worst = {"W": 0.0, "grad_rel": 0.0}
    for n, k in GRID:
        for tau in TAUS:
            s = _scores(rng, b, n)
            r = rng.normal(size=(b, k, n)).astype(np.float32)
            m = rng.normal(size=(b, n, d)).astype(np.float32)
            q = rng.normal(size=(b, k, d)).astype(np.float32)

            # Torch reference (float32 = what the official stage 3 runs; float64 = the formula's truth).
            st = torch.tensor(s, dtype=tdt, requires_grad=True)
            w_t, idx_t = _torch_official_topk(torch, st, k, tau)
            loss_lin = (w_t * torch.tensor(r, dtype=tdt)).sum()
            g_lin_t = torch.autograd.grad(loss_lin, st, retain_graph=True)[0].numpy()
            sel = torch.einsum("bkn,bnd->bkd", w_t, torch.tensor(m, dtype=tdt))
            loss_sel = (sel * torch.tensor(q, dtype=tdt)).sum()
            g_sel_t = torch.autograd.grad(loss_sel, st)[0].numpy()

            w_j, idx_j, g_lin_j, g_sel_j = _official_jax(s, r, m, q, tau, k=k)

            np.testing.assert_array_equal(np.asarray(idx_j), idx_t.numpy())
            w_err = float(np.abs(np.asarray(w_j) - w_t.detach().numpy()).max())
            assert w_err == 0.0
            for g_j, g_t in ((g_lin_j, g_lin_t), (g_sel_j, g_sel_t)):
                scale = max(1.0, float(np.abs(g_t).max()))
                err = float(np.abs(np.asarray(g_j, np.float64) - g_t).max())
                worst["grad_rel"] = max(worst["grad_rel"], err / scale)
                assert err <= GRAD_TOL * scale, (n, k, tau, err, scale)
            worst["W"] = max(worst["W"], w_err)
    print(
        f"official parity vs torch {torch_dtype}: max |dW| = {worst['W']}, "
        f"max grad err / max(1, |g|_inf) = {worst['grad_rel']:.3g}"
    )


# --------------------------------------------------------------------------------------------
# 3. Exact mode: no soft mass and no gradient for items taken by earlier slots.


def _earlier_pairs(idx):
    """(b, j, n) for every slot j >= 1 and item n picked by a slot < j."""
    b_, k = idx.shape
    return [(b, j, int(idx[b, jp])) for b in range(b_) for j in range(1, k) for jp in range(j)]


def test_exact_mode_no_mass_on_taken_items():
    rng = np.random.default_rng(2)
    for tau in TAUS:
        s = _scores(rng, 6, 20)
        logits = jnp.asarray(s) / tau
        _, idx = differentiable_topk(s, 5, tau)
        p = np.asarray(slot_distributions(logits, idx, mask_mode="exact"))
        pairs = _earlier_pairs(np.asarray(idx))
        assert all(p[b, j, n] == 0.0 for b, j, n in pairs)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


@functools.partial(jax.jit, static_argnames=("k", "mask_mode"))
def _jacobian_jit(s, tau, *, k, mask_mode):
    return jax.jacrev(lambda x: differentiable_topk(x, k, tau, mask_mode=mask_mode)[0])(s)


def _jacobian(s, k, tau, mask_mode):
    return np.asarray(_jacobian_jit(s, tau, k=k, mask_mode=mask_mode))


def test_exact_mode_no_gradient_to_taken_items_and_official_counterexample():
    # docs/official_code.md §8.1 item 2: at tau=0.02 the official -18.4 mask loses to a cosine gap > ~0.37.
    # Doc 0 (0.9) is taken by slot 0 and beats doc 1 (0.5) by 0.4, so in slot 1 official mode
    # still puts most soft mass (and gradient) on doc 0. This shows the checks below can fail.
    s = np.array([[0.9, 0.5, 0.1, 0.3, -0.2]], np.float32)
    tau, k = 0.02, 3
    logits = jnp.asarray(s) / tau
    _, idx = differentiable_topk(s, k, tau)
    np.testing.assert_array_equal(np.asarray(idx), [[0, 1, 3]])
    p_off = np.asarray(slot_distributions(logits, idx, mask_mode="official"))
    p_ex = np.asarray(slot_distributions(logits, idx, mask_mode="exact"))
    assert p_off[0, 1, 0] > 0.5  # the bug: slot 1 mostly "wants" the already-chosen doc 0
    assert p_ex[0, 1, 0] == 0.0 and p_ex[0, 2, 0] == 0.0 and p_ex[0, 2, 1] == 0.0

    # Loss that only looks at already-taken items in later slots: exactly zero gradient in exact
    # mode, large in official mode.
    pairs = tuple(zip(*_earlier_pairs(np.asarray(idx))))  # the hard picks do not depend on mode

    @functools.partial(jax.jit, static_argnums=1)
    def taken_mass_grad(x, mode):
        return jax.grad(lambda z: jnp.sum(differentiable_topk(z, k, tau, mask_mode=mode)[0][pairs]))(x)

    g_ex = np.asarray(taken_mass_grad(s, "exact"))
    g_off = np.asarray(taken_mass_grad(s, "official"))
    assert np.all(g_ex == 0.0)
    assert np.abs(g_off).max() > 1.0

    # Full Jacobian on random scores: for slot j, neither W[j, n_taken] depends on any score nor
    # does any W[j, :] depend on the score of an item taken by an earlier slot.
    rng = np.random.default_rng(3)
    for tau_r in TAUS:
        sr = _scores(rng, 3, 12)
        jac = _jacobian(sr, 4, tau_r, "exact")  # [B, k, N, B, N]
        _, ix = differentiable_topk(sr, 4, tau_r)
        for b, j, n in _earlier_pairs(np.asarray(ix)):
            assert np.all(jac[b, j, n, :, :] == 0.0)
            assert np.all(jac[b, j, :, b, n] == 0.0)
        assert np.abs(jac).max() > 0.0
    jac_off = _jacobian(s, k, tau, "official")
    assert np.abs(jac_off[0, 1, :, 0, 0]).max() > 1.0


def test_exact_mode_gradient_matches_analytic_formula():
    """d/ds_n = (1/tau) sum_j p_j(n) (G_jn - sum_m p_j(m) G_jm), p_j renormalised over untaken."""
    rng = np.random.default_rng(4)
    b, n, k, tau = 3, 10, 4, 0.02
    s = _scores(rng, b, n)
    g = rng.normal(size=(b, k, n))
    _, idx = differentiable_topk(s, k, tau)
    idx = np.asarray(idx)
    y = s.astype(np.float64) / tau
    ref = np.zeros((b, n))
    for bi in range(b):
        for j in range(k):
            z = y[bi].copy()
            z[idx[bi, :j]] = -np.inf
            p = np.exp(z - z.max())
            p /= p.sum()
            ref[bi] += p * (g[bi, j] - p @ g[bi, j]) / tau
    got = np.asarray(_linear_grad(s, g.astype(np.float32), tau, k=k))
    np.testing.assert_allclose(got, ref, rtol=0, atol=GRAD_TOL * max(1.0, np.abs(ref).max()))


# --------------------------------------------------------------------------------------------
# 4. Gumbel exploration.


def test_gumbel_noise_changes_selection_and_is_reproducible():
    rng = np.random.default_rng(5)
    s = _scores(rng, 4, 20)
    tau, k = 1.0, 5
    _, idx_det = _topk(s, k=k, temperature=tau)
    _, idx_det2 = _topk(s, k=k, temperature=tau)
    np.testing.assert_array_equal(np.asarray(idx_det), np.asarray(idx_det2))

    changed = 0
    for seed in range(8):
        key = jax.random.key(seed)
        w1, i1 = _topk(s, k=k, temperature=tau, key=key)
        w2, i2 = _topk(s, k=k, temperature=tau, key=key)
        np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
        np.testing.assert_array_equal(np.asarray(w1), np.asarray(w2))
        # Semantics: top-k of scores/tau + Gumbel(key); the forward stays the exact one-hot.
        noisy = jnp.asarray(s) / tau + jax.random.gumbel(key, s.shape, jnp.float32)
        np.testing.assert_array_equal(np.asarray(i1), np.asarray(jax.lax.top_k(noisy, k)[1]))
        np.testing.assert_array_equal(np.asarray(w1), np.asarray(jax.nn.one_hot(i1, 20)))
        changed += int(not np.array_equal(np.asarray(i1), np.asarray(idx_det)))
    assert changed > 0

    # gumbel_scale=0 is the deterministic selection; the gradient stays finite with noise.
    _, i0 = _topk(s, k=k, temperature=tau, key=jax.random.key(0), gumbel_scale=0.0)
    np.testing.assert_array_equal(np.asarray(i0), np.asarray(idx_det))
    r = rng.normal(size=(4, k, 20)).astype(np.float32)
    g = _linear_grad(s, r, 0.02, k=k, key=jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0


# --------------------------------------------------------------------------------------------
# 5. valid_mask.


def _mask_with_counts(rng, counts, n):
    mask = np.zeros((len(counts), n), bool)
    for b, c in enumerate(counts):
        mask[b, rng.permutation(n)[:c]] = True
    return mask


@pytest.mark.parametrize("mask_mode", ["exact", "official"])
def test_valid_mask_excludes_items(mask_mode):
    rng = np.random.default_rng(6)
    n, k = 12, 3
    mask = _mask_with_counts(rng, [12, 3, 5, 7], n)
    s = _scores(rng, 4, n)
    s[~mask] = 1.0  # invalid items would otherwise win every slot
    r = rng.normal(size=(4, k, n)).astype(np.float32)
    for tau in TAUS:
        w, idx = differentiable_topk(s, k, tau, mask_mode=mask_mode, valid_mask=mask)
        idx = np.asarray(idx)
        assert np.all(mask[np.arange(4)[:, None], idx])
        ref = np.asarray(jax.lax.top_k(jnp.where(mask, jnp.asarray(s), -jnp.inf), k)[1])
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_array_equal(np.asarray(w), np.asarray(jax.nn.one_hot(idx, n)))
        g = np.asarray(_linear_grad(s, r, tau, k=k, mask_mode=mask_mode, valid_mask=mask))
        assert np.all(np.isfinite(g))
        assert np.all(g[~mask] == 0.0)
        assert np.abs(g[mask]).max() > 0.0
        logits = jnp.asarray(s) / tau
        p = np.asarray(
            slot_distributions(logits, jnp.asarray(idx), mask_mode=mask_mode, valid_mask=jnp.asarray(mask))
        )
        assert all(np.all(p[b][:, ~mask[b]] == 0.0) for b in range(4))


def test_too_few_candidates_raise():
    s = np.zeros((2, 6), np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    with pytest.raises(ValueError, match=r"k=3 exceeds the number of valid candidates.*row 1 has only 2"):
        differentiable_topk(s, 3, 0.02, valid_mask=mask)
    differentiable_topk(s, 2, 0.02, valid_mask=mask)  # fine
    with pytest.raises(ValueError, match=r"k=7 exceeds the number of candidates N=6"):
        differentiable_topk(s, 7, 0.02)
    with pytest.raises(ValueError, match="k must be >= 1"):
        differentiable_topk(s, 0, 0.02)
    with pytest.raises(ValueError, match="mask_mode"):
        differentiable_topk(s, 2, 0.02, mask_mode="soft")
    with pytest.raises(ValueError, match="temperature"):
        differentiable_topk(s, 2, 0.0)
    # The concrete check also fires at trace time when the mask is a closed-over constant.
    with pytest.raises(ValueError, match="valid candidates"):
        jax.jit(lambda x: differentiable_topk(x, 3, 0.02, valid_mask=mask))(s)


@pytest.mark.parametrize("mask_mode", ["exact", "official"])
def test_too_few_candidates_under_jit_are_flagged(mask_mode):
    """Traced mask: unfillable slots get index -1 and an all-zero W row, with no NaN anywhere."""
    rng = np.random.default_rng(7)
    s = _scores(rng, 2, 6)
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 0, 0]], bool)
    r = rng.normal(size=(2, 3, 6)).astype(np.float32)

    @jax.jit
    def f(x, m):
        w, ix = differentiable_topk(x, 3, 0.02, mask_mode=mask_mode, valid_mask=m)
        return w, ix, jnp.sum(w * r)

    w, idx, _ = f(s, mask)
    w, idx = np.asarray(w), np.asarray(idx)
    assert idx[1, 2] == -1 and np.all(idx[1, :2] >= 0) and np.all(idx[0] >= 0)
    assert np.all(w[1, 2] == 0.0)
    ok_w, ok_idx = differentiable_topk(s[:1], 3, 0.02, mask_mode=mask_mode, valid_mask=mask[:1])
    np.testing.assert_array_equal(idx[:1], np.asarray(ok_idx))
    np.testing.assert_array_equal(w[:1], np.asarray(ok_w))
    g = np.asarray(jax.jit(jax.grad(lambda x, m: f(x, m)[2]))(s, mask))
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0.0)


# --------------------------------------------------------------------------------------------
# 6. jit.


@pytest.mark.slow
def test_jit_matches_eager():
    rng = np.random.default_rng(8)
    s = _scores(rng, 3, 20)
    mask = _mask_with_counts(rng, [20, 9, 14], 20)
    r = rng.normal(size=(3, 5, 20)).astype(np.float32)
    key = jax.random.key(3)
    for mask_mode in ("exact", "official"):
        kw = dict(mask_mode=mask_mode, key=key, valid_mask=mask)
        jitted = jax.jit(differentiable_topk, static_argnames=("k", "mask_mode"))

        w_e, i_e = differentiable_topk(s, 5, 0.02, **kw)
        w_j, i_j = jitted(s, k=5, temperature=jnp.float32(0.02), **kw)  # traced temperature
        np.testing.assert_array_equal(np.asarray(i_j), np.asarray(i_e))
        np.testing.assert_array_equal(np.asarray(w_j), np.asarray(w_e))

        def loss(x, tau, m, mask_mode=mask_mode):
            return jnp.sum(differentiable_topk(x, 5, tau, mask_mode=mask_mode, key=key, valid_mask=m)[0] * r)

        g_e = np.asarray(jax.grad(loss)(s, 0.02, mask))
        g_j = np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(s, 0.02, mask))  # Python float
        # XLA fuses differently from op-by-op dispatch; at tau=0.02 that is float32 noise of a few
        # 1e-6 relative to the gradient scale (see GRAD_TOL).
        np.testing.assert_allclose(g_j, g_e, rtol=0, atol=GRAD_TOL * max(1.0, np.abs(g_e).max()))


def test_graph_size_does_not_grow_with_k():
    s = jnp.zeros((2, 64), jnp.float32)
    sizes = {
        k: len(
            jax.make_jaxpr(jax.grad(lambda x, k=k: jnp.sum(differentiable_topk(x, k, 0.02)[0] ** 2)))(s).eqns
        )
        for k in (2, 16)
    }
    assert sizes[2] == sizes[16]


# --------------------------------------------------------------------------------------------
# 7. cosine_scores.


def test_cosine_scores_matches_numpy():
    rng = np.random.default_rng(9)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    c = rng.normal(size=(3, 7, 16)).astype(np.float32)
    c[1, 2] = 0.0  # zero vector: F.normalize gives 0, not NaN
    qn = q.astype(np.float64) / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    cn = c.astype(np.float64) / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
    ref = np.einsum("bd,bnd->bn", qn, cn)
    got = jax.jit(cosine_scores)(q, c)
    np.testing.assert_allclose(np.asarray(cosine_scores(q, c)), np.asarray(got), rtol=0, atol=1e-7)
    assert got.dtype == jnp.float32 and got.shape == (3, 7)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6)
    assert np.asarray(got)[1, 2] == 0.0
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(cosine_scores(a, b)), argnums=(0, 1)))(q, c)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)
    got_bf16 = cosine_scores(jnp.asarray(q, jnp.bfloat16), jnp.asarray(c, jnp.bfloat16))
    assert got_bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_bf16), ref, atol=2e-2)
