"""Rotary position embeddings (default, linear and llama3 scaling), as Hugging Face computes them."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxalign.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2] in float32, with the config's scaling applied.

    ``local``: those of the sliding-window layers of a model with a separate local base (Gemma 3's
    ``rope_local_theta``; default RoPE, unscaled)."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if local:
        return inv_freq
    if config.rope_type == "linear":
        # Linear scaling divides positions by the factor; dividing the frequencies is the same.
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        return _llama3_scaling(inv_freq, config)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, c: ModelConfig) -> np.ndarray:
    factor, low, high = c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor
    old_len = c.rope_original_max_position
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jnp.ndarray, inv_freq: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [B, T, head_dim] (float32) for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, heads, head_dim] with the rotate-half convention of Hugging Face Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
