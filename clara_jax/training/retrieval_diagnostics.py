"""Why a stage-3 run does (or does not) learn to retrieve: numbers computed inside the jitted step.

The straight-through top-k only teaches the query reasoner if its soft distributions put mass
on more than the picked document and if the scores can still move the ranking. These numbers,
logged with the loss, make a flat stage 3 explainable:

- `score_std`: spread of the candidate scores (cosine or dot; mean over questions). Against the
  temperature it says how peaked the softmax is (logit spread = score_std / tau).
- `topk_gap`: mean top-k score minus mean score of the other candidates.
- `topk_entropy`: entropy (nats) of the soft top-k rows, i.e. of each filled slot's masked
  softmax; near 0 means the gradient reaches only the picked document, near log(N) means the
  scores do not discriminate at all.
- `gold_outside_topk`: share of labelled questions none of whose gold documents was selected
  (the generator never saw the evidence).

Everything is a function of the (stop-gradient) scores and the hard picks: no host sync.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clara_jax.model.topk import slot_distributions


def _masked_mean(values, mask, axis=-1):
    mask = mask.astype(jnp.float32)
    return (values * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def retrieval_diagnostics(
    scores, indices, positives, valid, temperature: float, *, mask_mode: str = "exact"
) -> dict:
    """Scalars describing one batch's retrieval: see the module docstring.

    scores [B, N] (cosine or dot, before the temperature), indices [B, k] (hard picks, -1 = unfilled),
    positives / valid [B, N] bool.
    """
    scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
    valid = valid.astype(bool)
    mean = _masked_mean(scores, valid)
    var = _masked_mean(jnp.square(scores - mean[:, None]), valid)
    picked = (
        jnp.zeros_like(valid)
        .at[jnp.arange(scores.shape[0])[:, None], jnp.maximum(indices, 0)]
        .max(indices >= 0)
    )
    gap = _masked_mean(scores, picked) - _masked_mean(scores, valid & ~picked)

    soft = slot_distributions(scores / temperature, indices, mask_mode=mask_mode, valid_mask=valid)
    entropy = -(soft * jnp.log(jnp.where(soft > 0, soft, 1.0))).sum(-1)  # [B, k]; 0 for unfilled slots
    filled = (indices >= 0).astype(jnp.float32)

    labelled = positives.any(axis=1)
    missed = labelled & ~(positives & picked).any(axis=1)
    return {
        "score_std": jnp.sqrt(var).mean(),
        "topk_gap": gap.mean(),
        "topk_entropy": (entropy * filled).sum() / jnp.maximum(filled.sum(), 1.0),
        "gold_outside_topk": missed.sum() / jnp.maximum(labelled.sum(), 1),
    }
