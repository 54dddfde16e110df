"""One config-driven decoder-only transformer for the Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 and Gemma 3
(text) families.

Parameters are float32 masters carrying logical axis names (``axes`` metadata) that
:mod:`jaxalign.parallel` maps onto the mesh. Matmuls run in the compute ``dtype``; norms,
softmax and the returned logits are float32.

The layers are *scanned* (MaxText's ``scan_layers``): ``Decoder.layers`` is one
:class:`DecoderLayer` whose every variable carries a leading ``layers`` axis, and the forward is a
``jax.lax.scan`` over it, so the compiled program holds one layer however deep the model is.
Per-layer differences (a sliding window on some layers, Gemma 3's local RoPE base on those layers) are scanned
inputs, not module attributes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models.attention import IMPLS as ATTN_IMPLS
from jaxalign.models.attention import NO_WINDOW, attend, segment_slots
from jaxalign.models.config import ModelConfig
from jaxalign.models.kv_cache import KVCache, block_slots, is_unstacked, write_block
from jaxalign.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxalign.parallel.activations import (
    BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH, MLP as MLP_AXIS, VOCAB,
    activation_axis, constrain, embedding_lookup, features, gather_weight,
)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def _ones(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.float32), axes=axes)


def _zeros(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), axes=axes)


class Linear(nnx.Module):
    """x @ kernel (+ bias) (+ a LoRA adapter's update); kernel is [in, out]."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), axes)
        self.bias = _zeros((d_out,), (axes[1],)) if bias else None
        self.lora = nnx.data(None)  # a jaxalign.models.lora.LoRA under --tuner_type lora

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        # A 2-D matmul over all leading positions: with [B, T, D] kept 3-D, XLA's CPU backend lays the
        # backward's weight gradient out through transposing copies (about a quarter of a train step at
        # the demo's size); flattened, the gradient is one plain matmul.
        # Under a mesh (parallel.activations) the kernel is all-gathered over fsdp in the compute dtype
        # just before use and its gradient reduce-scattered; the output stays sharded over the batch.
        axes = self.kernel.get_metadata().get("axes")  # under the layer scan: ("layers", in, out)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = jnp.dot(x2.astype(dtype), gather_weight(self.kernel[...].astype(dtype), axes))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.lora is not None:
            y = y + self.lora(x2, dtype)
        y = y.reshape(*lead, y.shape[-1])
        return constrain(y, features(y, activation_axis(axes[-1]) if axes else None))


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, as Hugging Face does.

    ``plus_one`` (Gemma): the output is scaled by ``1 + scale`` (the stored weight starts at 0), multiplied
    in float32 before the cast back; Llama casts first and then multiplies by the weight."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        self.scale = _zeros((dim,), ("norm",)) if plus_one else _ones((dim,), ("norm",))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(dtype)
        return self.scale[...].astype(dtype) * x32.astype(dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional qkv bias and q/k norm, and a KV cache."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.c = c
        self.attn_impl = "auto"  # see jaxalign.models.attention and set_attn_impl
        h, n, k, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(h, n * d, ("embed", "heads"), bias=c.attention_bias, rngs=rngs)
        self.k_proj = Linear(h, k * d, ("embed", "kv_heads"), bias=c.attention_bias, rngs=rngs)
        self.v_proj = Linear(h, k * d, ("embed", "kv_heads"), bias=c.attention_bias, rngs=rngs)
        self.o_proj = Linear(n * d, h, ("heads", "embed"), bias=c.o_proj_bias, rngs=rngs)
        self.q_norm = RMSNorm(d, c.rms_norm_eps, c.norm_plus_one) if c.qk_norm else None
        self.k_norm = RMSNorm(d, c.rms_norm_eps, c.norm_plus_one) if c.qk_norm else None

    def __call__(self, x, cos, sin, key_valid, q_slots, k_slots, window, layer_cache, dtype, segments=None):
        """``window``: this layer's sliding window (a traced int32 under the layer scan; ``NO_WINDOW`` for a
        global layer) or None when no layer of the model has one. ``layer_cache``: (stacked keys [L, B, K, S, D],
        stacked values, this layer's index, first free slot), or (this layer's key blocks, each [B, K, S_b, D], value
        blocks, None, first free slot), or None. ``segments``: the shared-prefix layout (see
        :func:`~jaxalign.models.attention.attend`), without a cache."""
        c = self.c
        b, t, _ = x.shape
        x = constrain(x, (BATCH, LENGTH, EMBED))
        q = self.q_proj(x, dtype).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x, dtype).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x, dtype).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM))
        k, v = constrain(k, (BATCH, LENGTH, KV_HEADS, HEAD_DIM)), constrain(v, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # heads-major [B, K, T, D], as the cache
        if layer_cache is not None:
            # Write the new keys/values into this layer's slots of the stacked cache in place, then read the layer.
            keys, values, layer, start = layer_cache
            if layer is None:  # this layer's own blocks [B, K, S_b, D]: the last one takes the new tokens; all read
                offset = sum(block_slots(block) for block in keys[:-1])
                keys = (*keys[:-1], write_block(keys[-1], k, start - offset))
                values = (*values[:-1], write_block(values[-1], v, start - offset))
                k, v = keys, values
            else:  # the stacked arrays [L, B, K, S, D] carried through the layer scan
                keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), (layer, 0, 0, start, 0))
                values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), (layer, 0, 0, start, 0))
                k = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False)
            new_cache = (keys, values)
        else:
            new_cache = None
        kv_axes = (BATCH, KV_HEADS, LENGTH, HEAD_DIM)
        if isinstance(k, tuple):  # blocks (or blocks of row parts)
            k = jax.tree.map(lambda block: constrain(block.astype(dtype), kv_axes), k)
            v = jax.tree.map(lambda block: constrain(block.astype(dtype), kv_axes), v)
        else:
            k, v = constrain(k.astype(dtype), kv_axes), constrain(v.astype(dtype), kv_axes)
        out = attend(q, k, v, key_valid, q_slots, k_slots, sliding_window=window, impl=self.attn_impl,
                     static_window=c.sliding_window, scale=c.attn_scale, softcap=c.attn_logit_softcapping,
                     segments=segments)
        out = constrain(out.reshape(b, t, -1), (BATCH, LENGTH, HEADS))
        return self.o_proj(out, dtype), new_cache


def activation(name: str):
    """The MLP's gate activation by its Hugging Face name."""
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"activation {name!r}")


class MLP(nnx.Module):
    """A gated MLP: down(act(gate(x)) * up(x)); SwiGLU (silu), or Gemma's GeGLU (tanh-approximate gelu)."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.act = c.hidden_act
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=c.mlp_bias, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=c.mlp_bias, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), bias=c.mlp_bias, rngs=rngs)

    def __call__(self, x, dtype):
        x = constrain(x, (BATCH, LENGTH, EMBED))
        h = constrain(activation(self.act)(self.gate_proj(x, dtype)) * self.up_proj(x, dtype), (BATCH, LENGTH, MLP_AXIS))
        return self.down_proj(h, dtype)


class DecoderLayer(nnx.Module):
    """Llama order: x + attn(norm(x)), then + mlp(post_attention_layernorm(.)). With ``sandwich_norms`` (Gemma 2/3),
    as Hugging Face names them: x + post_attention_layernorm(attn(input_layernorm(x))), then
    + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(.)))."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_plus_one)
        self.input_layernorm = norm()
        self.self_attn = Attention(c, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm() if c.sandwich_norms else None
        self.post_feedforward_layernorm = norm() if c.sandwich_norms else None
        self.mlp = MLP(c, rngs=rngs)

    def __call__(self, x, cos, sin, key_valid, q_slots, k_slots, window, layer_cache, dtype, segments=None):
        x = constrain(x, (BATCH, LENGTH, EMBED))  # the residual stream stays sharded over the batch
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, key_valid, q_slots, k_slots, window,
                                         layer_cache, dtype, segments)
        if self.pre_feedforward_layernorm is not None:
            x = constrain(x + self.post_attention_layernorm(attn), (BATCH, LENGTH, EMBED))
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), dtype))
            return constrain(x, (BATCH, LENGTH, EMBED)), new_cache
        x = constrain(x + attn, (BATCH, LENGTH, EMBED))
        x = x + self.mlp(self.post_attention_layernorm(x), dtype)
        return constrain(x, (BATCH, LENGTH, EMBED)), new_cache


# ``--remat_policy``: what the backward keeps of each layer's forward. "full" keeps only the layer's input
# (recomputes the rest), "save_dots" also keeps the results of the weight matmuls (no batch dimensions;
# attention's batched dots are recomputed), "none" keeps everything (no rematerialisation).
REMAT_POLICIES = ("full", "save_dots", "none")

def set_remat(module: nnx.Module, flag: bool, policy: str = "full") -> None:
    """Turn gradient checkpointing on (with ``policy``, one of :data:`REMAT_POLICIES`) or off in every decoder
    inside ``module`` (a policy, a reward model's backbone, PPO's policy and value model)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Decoder):
            node.remat = policy if flag else "none"


def set_attn_impl(module: nnx.Module, impl: str) -> None:
    """Use attention implementation ``impl`` (one of :data:`jaxalign.models.attention.IMPLS`) in every
    attention layer inside ``module``."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention implementation {impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Attention):
            node.attn_impl = impl


def _checkpoint_policy(policy: str):
    if policy == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """One module like ``layers[0]`` whose every variable is the layers' variables stacked on a new leading
    axis, named ``layers`` in the ``axes`` metadata (replicated by the sharding rules)."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for _, node in nnx.iter_graph(stacked):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("axes") or (None,) * (node.ndim - 1)
            node.set_metadata("axes", ("layers", *axes))
    return stacked


class Decoder(nnx.Module):
    """A causal language model: ``model(input_ids, attention_mask, positions) -> logits``.

    With ``cache=`` the call appends the new tokens to a :class:`KVCache` and returns
    ``(logits, cache)``; prefill + single-token steps equal one full forward.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = "none"  # a remat policy; see set_remat
        c = config
        self.embed_tokens = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        self.layers = stack_layers([DecoderLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_plus_one)
        self.lm_head = None if c.tie_word_embeddings else _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"))

    def hidden_states(self, input_ids, attention_mask=None, positions=None, *, cache: KVCache | None = None,
                      segments=None, layers: tuple | None = None):
        """Final-norm hidden states [B, T, hidden] in the compute dtype (and the updated cache). ``segments`` [T]
        (a numpy array, no cache): slot t attends to segment 0 and its own segment only (one prompt shared by
        several completions: :mod:`jaxalign.trainers.shared_prefix`); pass the ``positions`` that go with it.
        ``layers``: the per-layer modules of :meth:`layer_list`, used over a per-layer cache (a decode step)."""
        if segments is not None and cache is not None:
            raise ValueError("segments apply to a forward without a KV cache")
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        start = cache.lengths[:, None] if cache is not None else 0
        if positions is None:
            positions = jnp.maximum(start + jnp.cumsum(attention_mask, axis=1) - 1, 0)
        rope = rope_tables(positions, jnp.asarray(inverse_frequencies(self.config)))
        if self.config.rope_local_theta is not None:  # Gemma 3: the sliding layers' own base
            rope = (*rope, *rope_tables(positions, jnp.asarray(inverse_frequencies(self.config, local=True))))
        if cache is None:
            # a shared-prefix row counts each completion's slots from the prompt's end (segment_slots)
            q_slots = k_slots = jnp.arange(t) if segments is None else jnp.asarray(segment_slots(segments))
            key_valid = attention_mask
        else:
            q_slots = cache.index + jnp.arange(t)
            new_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
            # attention reads the cache's first read_slots slots (per layer: the blocks present)
            k_slots = jnp.arange(cache.read_slots)
            key_valid = new_mask[:, : cache.read_slots]
        x = embedding_lookup(self.embed_tokens[...], input_ids, self.dtype)
        if self.config.embed_scale:  # Gemma: sqrt(hidden) rounded to the compute dtype first, as transformers does
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), jnp.float32).astype(self.dtype)
        x, new_kv = self._scan_layers(x, rope, key_valid, q_slots, k_slots, cache, segments, layers)
        x = constrain(self.norm(x), (BATCH, LENGTH, EMBED))
        if cache is None:
            return x, None
        new_cache = KVCache(
            keys=new_kv[0],
            values=new_kv[1],
            mask=new_mask,
            index=cache.index + t,
            lengths=cache.lengths + attention_mask.sum(axis=1),
        )
        return x, new_cache

    def layer_windows(self) -> jax.Array | None:
        """Each layer's sliding window (``NO_WINDOW`` for a global layer) [L] int32, or None when none slides."""
        c = self.config
        windows = [c.layer_sliding_window(i) for i in range(c.num_hidden_layers)]
        if all(w is None for w in windows):
            return None
        return jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)

    def layer_local_rope(self) -> jax.Array | None:
        """[L] bool: which layers rotate with the local RoPE base (Gemma 3's sliding layers), or None."""
        c = self.config
        if c.rope_local_theta is None:
            return None
        return jnp.asarray([c.layer_uses_local_rope(i) for i in range(c.num_hidden_layers)])

    @staticmethod
    def _layer_rope(rope, local):
        """(cos, sin) of one layer: ``rope`` is (cos, sin), or (cos, sin, local cos, local sin) with ``local`` a
        (traced or Python) bool saying which pair this layer uses."""
        if len(rope) == 2:
            return rope
        if isinstance(local, (bool, np.bool_)):
            return rope[2:] if local else rope[:2]
        return jnp.where(local, rope[2], rope[0]), jnp.where(local, rope[3], rope[1])

    def _scan_layers(self, x, rope, key_valid, q_slots, k_slots, cache: KVCache | None, segments=None, layers=None):
        """Run the stacked layers over ``x`` with ``jax.lax.scan``: (output, (keys, values) or None)."""
        graphdef, state = nnx.split(self.layers)
        windows = self.layer_windows()
        local_rope = self.layer_local_rope()
        dtype = self.dtype
        layer_ids = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
        xs = (state, layer_ids if windows is None else windows, layer_ids,
              layer_ids if local_rope is None else local_rope)

        if cache is None:
            def body(x, xs):
                layer_state, window, _, local = xs
                cos, sin = self._layer_rope(rope, local)
                layer = nnx.merge(graphdef, layer_state)
                y, _ = layer(x, cos, sin, key_valid, q_slots, k_slots, None if windows is None else window, None,
                             dtype, segments)
                return y, None

            if self.remat != "none":
                body = jax.checkpoint(body, policy=_checkpoint_policy(self.remat), prevent_cse=False)
            x, _ = jax.lax.scan(body, x, xs)
            return x, None

        def cached_body(carry, xs):
            x, keys, values = carry
            layer_state, window, i, local = xs
            cos, sin = self._layer_rope(rope, local)
            layer = nnx.merge(graphdef, layer_state)
            y, (keys, values) = layer(x, cos, sin, key_valid, q_slots, k_slots, None if windows is None else window,
                                      (keys, values, i, cache.index), dtype)
            return (y, keys, values), None

        if is_unstacked(cache):
            return self._unrolled_layers(x, rope, key_valid, q_slots, k_slots, cache, layers)
        (x, keys, values), _ = jax.lax.scan(cached_body, (x, cache.keys, cache.values), xs)
        return x, (keys, values)

    def layer_list(self) -> tuple:
        """Each layer as its own module, its parameters sliced out of the stack: a copy of every layer's weights.
        On CPU the sampler takes them once, outside its decode loop, since slicing the stack inside the loop
        copies every layer's weights at every step (XLA:CPU does not read a slice in place as a dot operand; ~13%
        of the decode at ~23M parameters, batch 64). On accelerators it does not, the memory matters more, and
        the slices stay in the loop (see :func:`jaxalign.rollout.generate.slices_weights_once`)."""
        graphdef, state = nnx.split(self.layers)
        return tuple(nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state))
                     for i in range(self.config.num_hidden_layers))

    def _unrolled_layers(self, x, rope, key_valid, q_slots, k_slots, cache: KVCache, layers=None):
        """The layers one after another (a Python loop, so one copy of the layer per layer in the program) over a
        per-layer cache (:func:`~jaxalign.models.kv_cache.unstack`): each layer's cache is updated and read in
        place. The sampler's decode step runs this way; it is forward-only, so the program grows by one layer's
        forward per layer. ``layers``: :meth:`layer_list`'s modules, sliced by the caller; else sliced here."""
        layers = self.layer_list() if layers is None else layers
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(layers):
            window = self.config.layer_sliding_window(i)
            cos, sin = self._layer_rope(rope, self.config.layer_uses_local_rope(i))
            x, (keys[i], values[i]) = layer(x, cos, sin, key_valid, q_slots, k_slots, window,
                                            (keys[i], values[i], None, cache.index), self.dtype)
        return x, (tuple(keys), tuple(values))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Project hidden states [B, (T,) hidden] to vocabulary logits in float32 (per batch shard under a
        mesh, the vocabulary over tensor), soft-capped when the config says so (Gemma 2). Every logit jaxalign
        produces (training's chunked head, the sampler) comes from here."""
        hidden = constrain(hidden, features(hidden, EMBED))
        if self.lm_head is None:
            w = gather_weight(self.embed_tokens[...].astype(hidden.dtype), ("vocab", "embed")).T
        else:
            w = gather_weight(self.lm_head[...].astype(hidden.dtype), ("embed", "vocab"))
        logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma 2: cap * tanh(logits / cap), in float32
            logits = jnp.tanh(logits / cap) * cap
        return constrain(logits, features(logits, VOCAB))

    def __call__(self, input_ids, attention_mask=None, positions=None, *, cache: KVCache | None = None,
                 layers: tuple | None = None):
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions, cache=cache, layers=layers)
        logits = self.logits(hidden)
        if cache is None:
            return logits
        return logits, new_cache
