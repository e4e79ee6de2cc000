"""Straight-through differentiable top-k for CLaRa stage 3 (paper Algorithm 1, docs/official_code.md §2.3).

The generator must see exactly the k retrieved documents (a hard selection), yet the query
reasoner needs a gradient through that selection. The forward value is therefore the hard top-k
one-hot; the backward pass is that of k sequential masked softmaxes, slot j renormalising over the
candidates not taken by slots < j.

Two masks for "already taken" exist because the official code's mask is too weak
(docs/official_code.md §8.1 item 2): it adds log(1e-8) ~ -18.4 to logits s/tau that span +-50 at tau=0.02, so a taken
document can keep most of a later slot's soft mass and receive gradient for a slot it can never
fill. `mask_mode="exact"` (default) removes taken items exactly, matching the paper's intent;
`mask_mode="official"` reproduces the official numbers for parity checks and ablations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASK_MODES = ("exact", "official")

# The official code clamps the temperature to this floor before dividing.
_MIN_TEMPERATURE = 1e-6
# The official additive mask is log(1 - taken + 1e-8); for a taken item that is float32 log(1e-8).
_OFFICIAL_TAKEN_LOGIT = float(np.log(np.float32(1e-8)))
# torch.nn.functional.normalize's default eps: divide by max(||x||, eps).
COSINE_EPS = 1e-12


SCORE_FUNCTIONS = ("cosine", "dot")
# The temperature the official code divides each score by before its top-k (modeling_clara.py at
# commit 857c3cf): cosine 0.02 (L1452, L686); the dot-product ("MIPS") branch 1 in training (L1436)
# and 0.5 at inference (L650). The inference value never changes a hard pick; `clara.temperature`
# is the one knob here, so a run reproducing the dot branch sets it to OFFICIAL_TEMPERATURE["dot"].
OFFICIAL_TEMPERATURE = {"cosine": 0.02, "dot": 1.0}
OFFICIAL_INFERENCE_TEMPERATURE = {"cosine": 0.02, "dot": 0.5}


def _score_inputs(queries, candidates):
    q = jnp.asarray(queries).astype(jnp.float32)
    c = jnp.asarray(candidates).astype(jnp.float32)
    if q.ndim != 2 or c.ndim != 3 or c.shape[0] != q.shape[0] or c.shape[2] != q.shape[1]:
        raise ValueError(f"expected queries [B, D] and candidates [B, N, D], got {q.shape} and {c.shape}")
    return q, c


def cosine_scores(queries: jax.Array, candidates: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
    """Cosine similarity [B, N] in float32, the scores stage 3 ranks candidates by.

    Follows F.normalize(x, p=2, dim=-1, eps=1e-12), i.e. x / max(||x||, eps), so an all-zero vector
    scores 0 instead of NaN. Unlike the official code, which normalises in the embedding dtype
    (bf16) and upcasts afterwards, inputs are upcast to float32 first: at tau=0.02 a bf16 rounding
    of the cosine (~4e-3) is a logit error of ~0.2 and can reorder near-ties.
    The norm is written as sqrt(max(sum x^2, eps^2)) (equal to max(||x||, eps)) so that the gradient
    at a zero vector is 0 rather than NaN.
    """
    q, c = _score_inputs(queries, candidates)
    eps2 = jnp.float32(eps) ** 2
    q = q / jnp.sqrt(jnp.maximum(jnp.sum(q * q, axis=-1, keepdims=True), eps2))
    c = c / jnp.sqrt(jnp.maximum(jnp.sum(c * c, axis=-1, keepdims=True), eps2))
    # HIGHEST: on TPU the default matmul precision is bf16-like, which is too coarse at tau=0.02.
    return jnp.einsum("bd,bnd->bn", q, c, precision=jax.lax.Precision.HIGHEST)


def dot_scores(queries: jax.Array, candidates: jax.Array) -> jax.Array:
    """Raw inner products [B, N] in float32: the official "MIPS" branch (`stage2_mips`), which
    scores unnormalised query-reasoner and document vectors. The official code multiplies in the
    vectors' own dtype (bf16); here they are upcast first, as in `cosine_scores`."""
    q, c = _score_inputs(queries, candidates)
    return jnp.einsum("bd,bnd->bn", q, c, precision=jax.lax.Precision.HIGHEST)


def retrieval_scores(queries: jax.Array, candidates: jax.Array, score: str = "cosine") -> jax.Array:
    """[B, N] scores of `score` ("cosine" or "dot", `clara.retrieval_score`): the one function
    stage-3 training, its InfoNCE term and every inference-time ranking share."""
    if score == "cosine":
        return cosine_scores(queries, candidates)
    if score == "dot":
        return dot_scores(queries, candidates)
    raise ValueError(f"score must be one of {SCORE_FUNCTIONS}, got {score!r}")


def _concrete_numpy(x) -> np.ndarray | None:
    """Host copy of x when its value is known now (eager or closed over), else None (traced)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_temperature(temperature):
    if isinstance(temperature, (int, float, np.floating, np.integer)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def slot_distributions(
    logits: jax.Array,
    indices: jax.Array,
    *,
    mask_mode: str = "exact",
    valid_mask: jax.Array | None = None,
) -> jax.Array:
    """Soft per-slot distributions K_soft [B, k, N] given the hard picks (the ST backward path).

    Exposed separately so tests and diagnostics can inspect where soft mass (and hence gradient)
    goes. `logits` are the (possibly noised) scores/tau; `indices` [B, k] are the hard picks with -1
    for slots that could not be filled, whose rows are all zero. All slots are computed at once:
    "taken before slot j" depends only on the hard picks (no gradient), so there is no sequential
    dependence to scan over and the graph size does not depend on k.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    B, N = logits.shape
    k_hard = jax.nn.one_hot(indices, N, dtype=jnp.float32)  # -1 -> all-zero row
    # Exclusive cumulative sum over slots: items picked by slots < j (picks are distinct, so 0/1).
    taken = jax.lax.stop_gradient(jnp.cumsum(k_hard, axis=1) - k_hard)  # [B, k, N]
    y = logits[:, None, :]
    if mask_mode == "official":
        # The official log(1 - taken + 1e-8) in float32 is log(1e-8) for taken items and exactly 0
        # otherwise (1 + 1e-8 rounds to 1). It is written as a select of those two constants because
        # under jit XLA reassociates (1 - t) + 1e-8 into (1 + 1e-8) - t = 1 - t, which turns the
        # official mask into -inf (i.e. silently into the exact mode).
        masked = y + jnp.where(taken > 0.5, _OFFICIAL_TAKEN_LOGIT, 0.0)
        allowed = jnp.ones((B, 1, N), dtype=bool)
    else:
        allowed = taken < 0.5
        masked = y
    if valid_mask is not None:
        allowed = allowed & valid_mask[:, None, :]
    slot_ok = indices >= 0  # [B, k]; a filled slot always has at least one allowed item
    masked = jnp.where(allowed, masked, -jnp.inf)
    # Unfillable slots would be softmax over all -inf (NaN); feed zeros and drop the result instead.
    # The double where keeps NaN out of both the value and the gradient.
    safe = jnp.where(slot_ok[:, :, None], masked, 0.0)
    p = jax.nn.softmax(safe, axis=-1)
    return jnp.where(slot_ok[:, :, None], p, 0.0)


def differentiable_topk(
    scores: jax.Array,
    k: int,
    temperature,
    *,
    mask_mode: str = "exact",
    key: jax.Array | None = None,
    valid_mask: jax.Array | None = None,
    gumbel_scale=1.0,
) -> tuple[jax.Array, jax.Array]:
    """Hard top-k in the forward pass with the gradient of sequential masked softmaxes.

    Returns W [B, k, N] float32 whose value is exactly one_hot(indices) (slots in descending score
    order, ties to the lower index as lax.top_k), and indices [B, k] int32. Use as
    einsum('bkn,bnd->bkd', W, docs) so the forward sees exactly the chosen docs while d/dscores is
    (1/tau) sum_j p_j * (G_j - <p_j, G_j>), with p_j the slot-j soft distribution.

    Args:
      scores: [B, N] similarities (cast to float32).
      k: static number of slots, 1 <= k <= N.
      temperature: softmax temperature (Python float or traced scalar), floored at 1e-6 like the
        official code.
      mask_mode: "exact" (taken items get zero soft mass) or "official" (log(1 - taken + 1e-8)).
      key: optional PRNG key; adds gumbel_scale * Gumbel(0, 1) to scores/tau before both the hard
        pick and the soft distributions, for exploration during training. None = deterministic.
      valid_mask: optional [B, N] bool; invalid candidates are never picked and get zero soft mass
        (in both mask modes). If a row has fewer than k valid candidates: with a concrete mask this
        raises ValueError; under jit (traced mask) the unfillable slots get index -1 and an all-zero
        row of W (value and gradient), so callers can detect them with `indices < 0`.
      gumbel_scale: multiplier of the Gumbel noise (ignored when key is None).
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    scores = jnp.asarray(scores).astype(jnp.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N], got shape {scores.shape}")
    B, N = scores.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"k must be a static Python int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > N:
        raise ValueError(f"k={k} exceeds the number of candidates N={N}")
    _check_temperature(temperature)

    if valid_mask is not None:
        # Look at the caller's object: inside jit even a constant becomes a tracer once jnp touches it.
        host_mask = _concrete_numpy(valid_mask)
        valid_mask = jnp.asarray(valid_mask).astype(bool)
        if valid_mask.shape != (B, N):
            raise ValueError(f"valid_mask must have shape {(B, N)}, got {valid_mask.shape}")
        if host_mask is not None:
            counts = host_mask.astype(bool).sum(axis=1)
            bad = np.nonzero(counts < k)[0]
            if bad.size:
                row = int(bad[0])
                raise ValueError(
                    f"k={k} exceeds the number of valid candidates in {bad.size} row(s) of valid_mask; "
                    f"e.g. row {row} has only {int(counts[row])} valid candidate(s)"
                )

    tau = jnp.maximum(jnp.asarray(temperature, dtype=jnp.float32), _MIN_TEMPERATURE)
    logits = scores / tau
    if key is not None:
        noise = jax.random.gumbel(key, logits.shape, dtype=jnp.float32)
        logits = logits + jnp.asarray(gumbel_scale, dtype=jnp.float32) * noise

    if valid_mask is None:
        _, indices = jax.lax.top_k(logits, k)
    else:
        _, indices = jax.lax.top_k(jnp.where(valid_mask, logits, -jnp.inf), k)
        n_valid = jnp.sum(valid_mask, axis=1, dtype=jnp.int32)
        slot_ok = jnp.arange(k, dtype=jnp.int32)[None, :] < n_valid[:, None]
        indices = jnp.where(slot_ok, indices, -1)
    indices = jax.lax.stop_gradient(indices.astype(jnp.int32))

    k_hard = jax.nn.one_hot(indices, N, dtype=jnp.float32)
    k_soft = slot_distributions(logits, indices, mask_mode=mask_mode, valid_mask=valid_mask)
    # Parenthesised as in the official code: soft - stop_gradient(soft) is exactly 0 in the forward,
    # so W's value is bit-for-bit the one-hot.
    w = k_hard + (k_soft - jax.lax.stop_gradient(k_soft))
    return w, indices
