"""A preallocated key/value cache for prefill + decode."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jaxalign.models.config import ModelConfig


# Keys and values are stored heads-major, [layers, B, kv_heads, max_len, head_dim]: the attention dots then read a
# layer in place; a [.., max_len, kv_heads, head_dim] cache costs a transpose copy of the whole cache per layer and
# step. The leading axis is the scanned layers' (see jaxalign.models.decoder).
KV_AXES = ("layers", "batch", "kv_heads", "length", None)
# The per-layer form (see unstack): blocks of [B, kv_heads, slots, head_dim] per layer.
LAYER_KV_AXES = KV_AXES[1:]


@struct.dataclass
class KVCache:
    """Every layer's keys and values, stacked [layers, B, kv_heads, max_len, head_dim], and the slots' bookkeeping.

    ``keys``/``values`` may instead be per layer (:func:`unstack`): a tuple over layers, each a tuple of blocks
    [B, kv_heads, slots, head_dim] that cover consecutive slots (or, split by rows, each block a tuple of row parts
    [B / parts, kv_heads, slots, head_dim]: see :func:`unstack`). The decoder then runs its layers unrolled and each
    decode step reads every layer's blocks in place, where reading a layer out of the stacked array inside the
    layer scan copies it (XLA does not alias a dynamic slice into a dot operand). New tokens are written into a
    layer's last block, and attention reads the blocks present: the sampler decodes in phases, each over the
    cache's first blocks (:func:`first_blocks`), so a step does not read the empty tail of the cache.

    ``mask`` [B, max_len] marks slots holding real tokens (left padding of prompts stays 0), ``index`` is the
    next free slot (shared by every row), ``lengths`` counts each row's real tokens so far and
    gives the next position.
    """

    keys: jax.Array | tuple[tuple[jax.Array, ...], ...]
    values: jax.Array | tuple[tuple[jax.Array, ...], ...]
    mask: jax.Array  # [B, max_len] int32
    index: jax.Array  # [] int32
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def read_slots(self) -> int:
        """How many leading slots attention reads: the blocks present (per-layer form), else every slot."""
        if is_unstacked(self):
            return sum(block_slots(block) for block in self.keys[0])
        return self.max_len


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


def unstack(cache: KVCache, blocks: Sequence[int] = (), row_parts: int = 1) -> KVCache:
    """The same cache per layer (one copy of the cache, made once): each layer's slots as its first block, then
    empty blocks of ``blocks`` slots each (the mask grows by as many empty slots). With ``row_parts`` > 1 every
    block is a tuple of that many arrays holding consecutive rows: attention then runs one dot per part, and
    XLA:CPU runs independent dots on different cores (it runs each one-query-per-row dot on one thread)."""
    if is_unstacked(cache):
        return cache
    b, kv_heads, _, head_dim = cache.keys.shape[1:]
    if b % row_parts:
        raise ValueError(f"{b} rows do not split into {row_parts} equal parts")

    def split(block):
        return block if row_parts == 1 else row_parts_of(block, row_parts)

    def layer(stacked, i):
        empty = tuple(jnp.zeros((b, kv_heads, n, head_dim), stacked.dtype) for n in blocks)
        return tuple(split(block) for block in (stacked[i], *empty))

    layers = range(cache.keys.shape[0])
    mask = jnp.pad(cache.mask, ((0, 0), (0, sum(blocks))))
    return cache.replace(keys=tuple(layer(cache.keys, i) for i in layers),
                         values=tuple(layer(cache.values, i) for i in layers), mask=mask)


def row_parts_of(x: jax.Array, parts: int) -> tuple[jax.Array, ...]:
    """``x`` cut along its first axis into ``parts`` equal row parts, by plain slices (``jnp.split`` measured
    ~2 ms per decode step slower in the sampler at 60M parameters, batch 64)."""
    rows = x.shape[0] // parts
    return tuple(x[i * rows:(i + 1) * rows] for i in range(parts))


def block_slots(block) -> int:
    """How many slots a per-layer block covers (an array [B, kv_heads, slots, head_dim] or its row parts)."""
    return (block[0] if isinstance(block, tuple) else block).shape[2]


def write_block(block, new: jax.Array, slot) -> jax.Array | tuple[jax.Array, ...]:
    """``block`` with ``new`` [B, kv_heads, T, head_dim] written from its slot ``slot`` on (each row part its
    rows)."""
    if not isinstance(block, tuple):
        return jax.lax.dynamic_update_slice(block, new.astype(block.dtype), (0, 0, slot, 0))
    return tuple(jax.lax.dynamic_update_slice(part, rows.astype(part.dtype), (0, 0, slot, 0))
                 for part, rows in zip(block, row_parts_of(new, len(block))))


def first_blocks(cache: KVCache, n: int) -> KVCache:
    """A per-layer cache narrowed to each layer's first ``n`` blocks: attention over it reads only their slots,
    and new tokens go into block ``n - 1``. Put the result back with :func:`put_blocks`."""
    return cache.replace(keys=tuple(k[:n] for k in cache.keys), values=tuple(v[:n] for v in cache.values))


def put_blocks(cache: KVCache, part: KVCache) -> KVCache:
    """``cache`` with its first blocks, mask, index and lengths taken from ``part`` (see :func:`first_blocks`)."""
    def merge(full, first):
        return tuple((*f, *whole[len(f):]) for whole, f in zip(full, first))

    return part.replace(keys=merge(cache.keys, part.keys), values=merge(cache.values, part.values))


def layer_slots(blocks: tuple) -> jax.Array:
    """One layer's blocks joined into [B, kv_heads, slots, head_dim] (a copy: for tests and inspection)."""
    blocks = [jnp.concatenate(b, axis=0) if isinstance(b, tuple) else b for b in blocks]
    return jnp.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]


def is_unstacked(cache: KVCache) -> bool:
    return isinstance(cache.keys, tuple)
