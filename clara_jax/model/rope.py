"""Rotary position embeddings in the rotate-half layout that HF Llama checkpoints assume.

Using HF's layout means q/k projection weights load without any permutation. Partial rotary
(Phi-3/Phi-4: only the first `rotary_dim` dims of a head rotate) and LongRoPE follow
transformers' Phi-3 code.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(rotary_dim: int, theta: float, scaling: tuple, long: bool = False) -> np.ndarray:
    """Per-pair rotation frequencies, computed once on the host in float32 like transformers.

    `long` picks LongRoPE's long factors (ignored by the other rope types).
    """
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    kind = scaling[0]
    if kind == "longrope":
        # transformers: 1 / (ext_factors * base**exponents), all in float32.
        ext = np.asarray(scaling[2] if long else scaling[1], np.float32)
        return (1.0 / (ext * (np.float32(theta) ** exponents))).astype(np.float32)
    inv_freq = (1.0 / (theta**exponents)).astype(np.float32)
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


def position_frequencies(rotary_dim: int, theta: float, scaling: tuple, positions: jnp.ndarray):
    """inv_freq for one forward call.

    LongRoPE mirrors transformers' `longrope_frequency_update`: the long factors are used for
    every position of a call whose largest position id + 1 exceeds
    `original_max_position_embeddings`, the short ones otherwise. The choice is made per call
    (jit-traceable), so a cached decode step past the original window uses the long factors
    for its new tokens while earlier cached keys keep theirs, exactly as transformers' forward.
    """
    short = inverse_frequencies(rotary_dim, theta, scaling)
    if scaling[0] != "longrope":
        return jnp.asarray(short)
    long = inverse_frequencies(rotary_dim, theta, scaling, long=True)
    use_long = jnp.max(positions) + 1 > scaling[3]
    return jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))


def attention_scaling(scaling: tuple) -> float:
    """The factor transformers multiplies cos/sin by (LongRoPE's attention_factor, else 1)."""
    return float(scaling[4]) if scaling[0] == "longrope" else 1.0


def rotary_tables(positions: jnp.ndarray, inv_freq, scale: float = 1.0):
    """cos/sin of shape [B, S, rotary_dim] for integer positions [B, S] (float32 math)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, S, heads, head_dim]; cos/sin: [B, S, rotary_dim] with rotary_dim <= head_dim.

    Only the first rotary_dim dims rotate (rotate-half within them); the rest pass through.
    """
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    out = x_rot * cos + rotated * sin
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out
