"""AdamW with the paper's schedule, over the trainable leaves only.

The official runs use HF semantics: lr is 0 at the first update, rises linearly for
ceil(3 % of the steps), then follows a cosine down to 10 % of the peak (stage 3: constant).
"""

from __future__ import annotations

import dataclasses
import math

import optax

from clara_jax.model.field_checks import check_fields


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    schedule: str = "cosine"  # "cosine" (warmup + cosine to min_lr_ratio) or "constant"
    total_steps: int = 1000
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0

    def __post_init__(self):
        check_fields(
            ("optim.lr", self.learning_rate, self.learning_rate > 0, "> 0"),
            (
                "optim.schedule",
                self.schedule,
                self.schedule in ("cosine", "constant"),
                "'cosine' or 'constant'",
            ),
            ("optim.warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("optim.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("optim.clip_norm", self.clip_norm, self.clip_norm > 0, "> 0"),
            ("total_steps", self.total_steps, self.total_steps >= 1, ">= 1 (the schedule's length)"),
        )


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    warmup = math.ceil(cfg.total_steps * cfg.warmup_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (no weight decay by default, as the official runs)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        ),
    )
