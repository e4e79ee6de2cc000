"""Short import path for the stage-3 straight-through top-k (implementation in clara_jax.model.topk)."""

from clara_jax.model.topk import cosine_scores, differentiable_topk, slot_distributions  # noqa: F401

__all__ = ["cosine_scores", "differentiable_topk", "slot_distributions"]
