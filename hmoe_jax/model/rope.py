"""Rotary position embeddings with YaRN scaling, as transformers computes them.

Pure functions. The inverse frequencies are computed in float32 numpy with the same operation order as
`transformers.modeling_rope_utils._compute_yarn_parameters` (to within 2 ulp, see below); the angles
are `position * inv_freq` in float32, and both cos and sin carry the YaRN attention factor.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import GptOssConfig


def yarn_correction_range(config: GptOssConfig) -> tuple[float, float]:
    """The (low, high) dimension bounds of YaRN's linear ramp; rounded only when `truncate` is set."""
    d, base, l0 = config.head_dim, config.rope_theta, config.rope_original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (d * math.log(l0 / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, d - 1)


def inverse_frequencies(config: GptOssConfig) -> np.ndarray:
    """float32 [head_dim / 2]."""
    d, base = config.head_dim, config.rope_theta
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    # base ** (2i/d), correctly rounded to float32 (via float64). torch's float32 pow is off by one
    # ulp for a few i, so the tables agree with transformers to within 2 ulp, not bit for bit.
    pos_freqs = np.power(np.float64(base), exponents.astype(np.float64)).astype(np.float32)
    if config.rope_type != "yarn":
        return (np.float32(1.0) / pos_freqs).astype(np.float32)
    low, high = yarn_correction_range(config)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1) - ramp).astype(np.float32)
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(config.rope_factor) * pos_freqs)
    inv_freq = inv_interpolation * (np.float32(1) - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32)


def rope_tables(position_ids: jnp.ndarray, config: GptOssConfig, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, T, head_dim / 2], cast to the compute dtype as transformers does."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq
    scale = jnp.float32(config.attention_scaling)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half (NeoX) rotation. x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim / 2]."""
    first, second = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
