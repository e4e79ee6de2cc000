"""Rotary position embeddings in the rotate-half layout that HF Llama checkpoints assume.

Using HF's layout means q/k projection weights load without any permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling: tuple) -> np.ndarray:
    """Per-pair rotation frequencies, computed once on the host in float32 like transformers."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (theta**exponents)).astype(np.float32)
    kind = scaling[0]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / scaling[1]).astype(np.float32)
    if kind == "llama3":
        _, factor, low_ff, high_ff, old_len = scaling
        low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling {scaling!r}")


def rotary_tables(positions: jnp.ndarray, inv_freq: np.ndarray):
    """cos/sin of shape [B, S, head_dim] for integer positions [B, S] (float32 math)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, S, heads, head_dim]; cos/sin: [B, S, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
