"""A preallocated key/value cache for prefill + decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxalign.models.config import ModelConfig


# Keys and values are stored heads-major, [layers, B, kv_heads, max_len, head_dim]: the attention dots then read a
# layer in place; a [.., max_len, kv_heads, head_dim] cache costs a transpose copy of the whole cache per layer and
# step. The leading axis is the scanned layers' (see jaxalign.models.decoder).
KV_AXES = ("layers", "batch", "kv_heads", "length", None)
# The per-layer form (see unstack): one [B, kv_heads, max_len, head_dim] array per layer.
LAYER_KV_AXES = KV_AXES[1:]


@struct.dataclass
class KVCache:
    """Every layer's keys and values, stacked [layers, B, kv_heads, max_len, head_dim], and the slots' bookkeeping.

    ``keys``/``values`` may instead be tuples of per-layer [B, kv_heads, max_len, head_dim] arrays
    (:func:`unstack`): the decoder then runs its layers unrolled and each decode step reads every layer's
    cache in place, where reading a layer out of the stacked array inside the layer scan copies it (XLA
    does not alias a dynamic slice into a dot operand). The sampler decodes in this form.

    ``mask`` marks slots holding real tokens (left padding of prompts stays 0), ``index`` is the
    next free slot (shared by every row), ``lengths`` counts each row's real tokens so far and
    gives the next position.
    """

    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array  # [B, max_len] int32
    index: jax.Array  # [] int32
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for ``batch_size`` rows of at most ``max_len`` tokens."""
    shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch_size, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )


def unstack(cache: KVCache) -> KVCache:
    """The same cache with per-layer key/value arrays (one copy of the cache, made once)."""
    if isinstance(cache.keys, tuple):
        return cache
    layers = cache.keys.shape[0]
    return cache.replace(keys=tuple(cache.keys[i] for i in range(layers)),
                         values=tuple(cache.values[i] for i in range(layers)))


def is_unstacked(cache: KVCache) -> bool:
    return isinstance(cache.keys, tuple)
