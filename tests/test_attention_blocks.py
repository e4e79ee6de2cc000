"""Blocked, recomputed attention equals the plain formula, in value and in gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.model import decoder


def _inputs(s=37, t=37, b=2, h=4, kv=2, dh=8, seed=0):
    kq, kk, kv_, km = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, s, h, dh))
    k = jax.random.normal(kk, (b, t, kv, dh))
    v = jax.random.normal(kv_, (b, t, kv, dh))
    causal = jnp.tril(jnp.ones((s, t), bool), k=t - s)
    padding = jax.random.bernoulli(km, 0.8, (b, 1, t)).at[:, :, -1].set(True)
    allowed = causal[None] & padding
    allowed = allowed.at[0, 3].set(False)  # a fully masked row stays finite
    return q, k, v, allowed


def _reference(q, k, v, allowed):
    b, s, h, dh = q.shape
    g = h // k.shape[2]
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q, kr) / np.sqrt(dh)
    scores = jnp.where(allowed[:, None], scores, decoder._MASKED)
    return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(scores, -1), vr).reshape(b, s, h * dh)


@pytest.mark.parametrize("block", [5, 16, 37, 128])
def test_blocked_attention_equals_the_formula_and_its_gradient(block):
    q, k, v, allowed = _inputs()
    np.testing.assert_allclose(decoder.attention(q, k, v, allowed, block), _reference(q, k, v, allowed), atol=2e-6)
    w = jax.random.normal(jax.random.key(1), (q.shape[0], q.shape[1], q.shape[2] * q.shape[3]))
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v, allowed))  # noqa: E731
    got = jax.grad(loss(lambda *a: decoder.attention(*a, block)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5)


def test_the_backward_pass_saves_no_scores():
    """The step's temporaries must not hold S x T probabilities per layer: the saved residuals of
    a long sequence stay far below one [B, H, S, T] float32 array."""
    q, k, v, allowed = _inputs(s=512, t=512, b=1, h=4, kv=2, dh=8)
    scores_bytes = 1 * 4 * 512 * 512 * 4
    _, vjp = jax.vjp(lambda q, k, v: decoder.attention(q, k, v, allowed, 128), q, k, v)
    saved = sum(x.nbytes for x in jax.tree.leaves(vjp) if hasattr(x, "nbytes"))
    assert saved < scores_bytes / 4, f"the backward keeps {saved} bytes, one score array is {scores_bytes}"
