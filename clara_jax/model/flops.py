"""Analytic FLOP counts for the decoder, for throughput and utilisation reports.

XLA's cost analysis counts a `lax.scan` body once, not once per layer, so it undercounts a
scanned decoder; these formulas count what the program really does (attention over the full
padded square, as our kernel computes it).
"""

from __future__ import annotations

from clara_jax.model.config import DecoderConfig
from clara_jax.model.lora import projection_shapes


def forward_flops(
    cfg: DecoderConfig,
    batch: int,
    seq: int,
    *,
    lora_rank: int = 0,
    logits: bool = True,
    kv_len: int | None = None,
) -> float:
    """Multiply-adds x2 of one forward over [batch, seq] tokens attending to kv_len keys."""
    kv_len = seq if kv_len is None else kv_len
    shapes = projection_shapes(cfg)
    dense = sum(d_in * d_out for d_in, d_out in shapes.values())
    lora = lora_rank * sum(d_in + d_out for d_in, d_out in shapes.values())
    attention = 2 * kv_len * cfg.q_dim  # q.k and p.v
    per_token = 2 * cfg.num_layers * (dense + lora + attention)
    if logits:
        per_token += 2 * cfg.hidden_size * cfg.vocab_size
    return float(per_token * batch * seq)


def lora_train_flops(
    cfg: DecoderConfig, batch: int, seq: int, *, lora_rank: int, logits: bool = True
) -> float:
    """Forward + backward with a frozen base: activation gradients cost one more forward, and
    only the adapters' weight gradients are added (no base weight gradients)."""
    fwd = forward_flops(cfg, batch, seq, lora_rank=lora_rank, logits=logits)
    shapes = projection_shapes(cfg)
    lora_weight_grads = 2 * cfg.num_layers * lora_rank * sum(a + b for a, b in shapes.values()) * batch * seq
    return 2 * fwd + float(lora_weight_grads)


def measured_matmul_flops(n: int = 1024, dtype="float32", repeats: int = 5) -> float:
    """This device's dense-matmul FLOP/s, measured: the denominator of a utilisation estimate
    when the hardware's peak is not known (CPUs, unlisted accelerators)."""
    import time

    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(mm(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
