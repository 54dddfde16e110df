"""Softmax attention behind one function, :func:`attend`, with interchangeable implementations.

``q`` [B, T, N, D] attends over ``k``, ``v`` [B, K, S, D] (heads-major, as the KV cache); N = K * G
query heads share each key/value head (GQA). Key ``s`` is allowed for query ``t`` of row ``b`` when

* ``k_slots[s] <= q_slots[t]`` (causal on slot indices: the cache case has ``q_slots`` offset and S > T),
* ``q_slots[t] - k_slots[s] < sliding_window`` (when a window is given), and
* ``key_valid[b, s]`` is non-zero (padding; rows may start with pad keys).

With ``segments`` (self-attention) a row holds a shared prefix (segment 0) followed by segments 1, 2, ...
that each see the prefix and themselves only: a prompt once, then several completions of it (GRPO's group).
Each segment's slots are its tokens' indices in a sequence of its own (:func:`segment_slots`), so the rules
above hold as in one sequence per completion. :func:`attend` runs the prefix, then each segment over the
prefix's keys and its own, so the work is that of the separate sequences, not of the whole row squared.

A query with no allowed key (a left-pad position) gets a finite output that nothing reads.

Scores are ``q.k * scale`` (default ``D**-0.5``); with ``softcap`` (Gemma 2's ``attn_logit_softcapping``) they
become ``softcap * tanh(scores / softcap)`` before masking. ``xla``, ``chunked`` (forward and custom backward)
and ``splash`` (its ``attn_logits_soft_cap``) cap; cuDNN's fused attention cannot, so ``cudnn`` (and ``auto`` on
a GPU) runs ``chunked`` when a softcap is set.

``sliding_window`` is None (no window), a Python int, or a traced int32 scalar (a scanned layer's
window); the sentinel :data:`NO_WINDOW` (2**30, longer than any sequence) means "no window" in a traced
value. Implementations (``impl``):

* ``xla``: the scores [B, K, G, T, S] in float32, masked, softmaxed (the reference; fastest when short).
* ``chunked``: flash-style online softmax over key blocks inside query blocks (``lax.scan``), with a
  custom backward that recomputes each block from the saved log-sum-exp; never holds more than one
  [block_q, block_k] tile of scores per head; blocks no query of the tile may see are skipped. Pure XLA:
  the CPU choice at long lengths and the fallback everywhere.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN flash attention (GPU,
  bfloat16/float16). Padding, window and cache offsets travel as a boolean mask [B, 1, T, S] (one byte
  per query-key pair per row instead of float32 scores per head).
* ``splash``: the Pallas splash-attention kernel (TPU): a causal or local mask, GQA through its
  multi-head kernel, padding through segment ids (pad 0, real 1), under ``shard_map`` over the batch
  (``data``, ``fsdp``) and head (``tensor``) axes of the mesh set with ``jax.set_mesh``. Only for
  self-attention without a cache whose length is a multiple of 128; other calls fall back to ``chunked``.
* ``auto``: TPU -> ``splash`` where it applies, else ``chunked``; GPU -> ``cudnn`` for bfloat16/float16,
  else as CPU; CPU -> ``xla`` below :data:`CHUNKED_MIN_KEYS` keys, ``chunked`` from there (measured:
  see bench/attention.py). A decode step (T == 1) always uses ``xla`` under ``auto``/``cudnn``/``splash``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import ConfigError
from jaxalign.models.kv_cache import row_parts_of

IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")

# A traced ``sliding_window`` equal to this means "no window" (larger than any sequence).
NO_WINDOW = 2**30

# Tile sizes of ``chunked`` (queries x keys per step); shorter inputs use one tile of their own length.
BLOCK_Q = 512
BLOCK_K = 512

# ``auto`` on CPU (and GPU without cuDNN) uses ``chunked`` from this many keys on; measured with
# bench/attention.py (forward + backward, side by side in one process), see bench/RESULTS.md.
CHUNKED_MIN_KEYS = 512

_NEG = float(jnp.finfo(jnp.float32).min)


def attend(q, k, v, key_valid, q_slots, k_slots, *, sliding_window=None, impl: str = "auto",
           static_window: int | None = None, scale: float | None = None, softcap: float | None = None,
           segments=None) -> jax.Array:
    """Softmax attention of q [B, T, N, D] over k, v [B, K, S, D] -> [B, T, N, D] in ``v.dtype``.

    ``key_valid`` [B, S] (non-zero: a real key), ``q_slots`` [T] and ``k_slots`` [S] int32 slot indices,
    ``sliding_window`` None / int / traced int32 (:data:`NO_WINDOW`: none). ``static_window`` is the value a
    traced window takes on sliding layers (the model's ``config.sliding_window``; None: no layer slides),
    needed only by ``splash``, whose masks are built at trace time. ``scale`` multiplies q.k (default
    ``D**-0.5``); ``softcap`` caps the scaled scores at +-softcap through tanh. ``segments`` [T] (a static
    numpy array, T == S, the slots from :func:`segment_slots`): the shared-prefix layout above.

    ``k`` and ``v`` may also be tuples of blocks [B, K, S_b, D] covering consecutive slots (a per-layer KV cache,
    see :mod:`jaxalign.models.kv_cache`): each block is read in place and the scores are joined, with ``xla``.
    Blocks split into row parts (tuples of [B / parts, K, S_b, D]) are attended part by part.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    softcap = None if softcap is None else float(softcap)
    if isinstance(k, tuple):
        return _xla(q, k, v, key_valid, q_slots, k_slots, sliding_window, scale=scale, softcap=softcap)
    if segments is not None:
        run = functools.partial(attend, sliding_window=sliding_window, impl=impl, static_window=static_window,
                                scale=scale, softcap=softcap)
        return _by_segment(run, q, k, v, key_valid, q_slots, segments)
    impl = _resolve(impl, q, k)
    if impl == "cudnn" and softcap is not None:
        impl = "chunked"  # cuDNN flash attention has no logit soft-capping
    if impl == "xla":
        return _xla(q, k, v, key_valid, q_slots, k_slots, sliding_window, scale=scale, softcap=softcap)
    if impl == "chunked":
        return chunked(q, k, v, key_valid, q_slots, k_slots, sliding_window, scale=scale, softcap=softcap)
    if impl == "cudnn":
        return dot_product(q, k, v, key_valid, q_slots, k_slots, sliding_window, implementation="cudnn", scale=scale)
    return splash(q, k, v, key_valid, sliding_window, static_window=static_window, scale=scale, softcap=softcap)


def check_impl(impl: str, platform: str) -> str:
    """``impl`` if the devices of ``platform`` (``cpu``, ``gpu``/``cuda``, ``tpu``) can run it, else a one-line
    :class:`ConfigError` naming ``--attn_impl``."""
    if impl not in IMPLS:
        raise ConfigError(f"--attn_impl {impl!r}: not one of {', '.join(IMPLS)}")
    need = {"cudnn": ("GPU", ("gpu", "cuda", "rocm")), "splash": ("TPU", ("tpu",))}.get(impl)
    if need is not None and platform not in need[1]:
        raise ConfigError(f"--attn_impl {impl} needs a {need[0]} (these devices are {platform}); "
                          "use auto, xla or chunked")
    return impl


# ----- shared-prefix rows ---------------------------------------------------------------------------------
def segment_slots(segments) -> np.ndarray:
    """[T] int32: each slot's index in its own sequence, the prefix (segment 0, which must come first) then
    its segment: slot t of segment i > 0 counts the prefix's slots and its own segment's before it."""
    segments = np.asarray(segments)
    if (np.diff((segments == 0).astype(np.int8)) > 0).any():
        raise ValueError("segment 0 (the shared prefix) must come before every other segment")
    prefix = int((segments == 0).sum())
    out = np.arange(len(segments), dtype=np.int32)
    for seg in np.unique(segments[segments > 0]):
        where = np.flatnonzero(segments == seg)
        if np.any(np.diff(where) != 1):
            raise ValueError(f"segment {seg} is not contiguous")
        out[where] = prefix + np.arange(len(where))
    return out


def _by_segment(run, q, k, v, key_valid, slots, segments):
    """Attention of a shared-prefix row as the prefix over itself plus, per segment, its queries over the
    prefix's keys and its own (static slices; ``run`` is :func:`attend` with the call's options)."""
    segments = np.asarray(segments)
    if q.shape[1] != k.shape[2] or len(segments) != q.shape[1]:
        raise ValueError("attention segments need self-attention with one segment id per slot")
    p = int((segments == 0).sum())
    outs = [run(q[:, :p], k[:, :, :p], v[:, :, :p], key_valid[:, :p], slots[:p], slots[:p])] if p else []
    starts = p + np.flatnonzero(np.diff(segments[p - 1 :]) != 0) if p else np.flatnonzero(np.diff(segments)) + 1
    bounds = [*(int(x) for x in starts), len(segments)]
    if not p:
        bounds = [0, *bounds]

    def with_prefix(x, axis, lo, hi):  # the prefix's slots, then [lo, hi)
        take = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)
        return jnp.concatenate([take(0, p), take(lo, hi)], axis=axis) if p else take(lo, hi)

    for lo, hi in zip(bounds[:-1], bounds[1:]):
        outs.append(run(q[:, lo:hi], with_prefix(k, 2, lo, hi), with_prefix(v, 2, lo, hi),
                        with_prefix(key_valid, 1, lo, hi), slots[lo:hi], with_prefix(slots, 0, lo, hi)))
    return jnp.concatenate(outs, axis=1)


# ----- choosing ----------------------------------------------------------------------------------------
def _platform() -> str:
    """The platform being compiled for: the context mesh's (set with ``jax.set_mesh``; an ahead-of-time
    compile for a TPU topology sets a TPU mesh), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def _is_static(window) -> bool:
    return window is None or isinstance(window, (int, np.integer))


def splash_applies(q, k) -> bool:
    """Whether ``splash`` can take these inputs: self-attention without a cache (T == S), T a multiple of
    128, and a context mesh to ``shard_map`` over or a single device (Mosaic kernels are not partitioned
    automatically)."""
    t, s = q.shape[1], k.shape[2]
    if t != s or t % 128:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty or jax.device_count() == 1


def cudnn_applies(q, k) -> bool:
    """Whether cuDNN flash attention takes these shapes and dtypes (bfloat16/float16, head dim a multiple of
    8 up to 128, even lengths: its masked backward needs them)."""
    d, t, s = q.shape[-1], q.shape[1], k.shape[2]
    return q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128 and t % 2 == 0 and s % 2 == 0


def _resolve(impl: str, q, k) -> str:
    t, s = q.shape[1], k.shape[2]
    if impl in ("xla", "chunked"):
        return impl
    if t == 1:  # a decode step: one query row, nothing to tile
        return "xla"
    if impl == "splash":
        return "splash" if splash_applies(q, k) else "chunked"
    if impl == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ConfigError(f"--attn_impl cudnn: cuDNN flash attention needs bfloat16 or float16 compute, not "
                              f"{q.dtype}; pass --torch_dtype bfloat16 (infer: --dtype bfloat16) or --attn_impl auto")
        return "cudnn" if cudnn_applies(q, k) else "chunked"
    platform = _platform()
    if platform == "tpu":
        return "splash" if splash_applies(q, k) else "chunked"
    if platform in ("gpu", "cuda", "rocm") and cudnn_applies(q, k):
        return "cudnn"
    return "chunked" if s >= CHUNKED_MIN_KEYS else "xla"


# ----- xla: the reference ------------------------------------------------------------------------------
def _xla(q, k, v, key_valid, q_slots, k_slots, sliding_window=None, *, scale: float | None = None,
         softcap: float | None = None):
    """The scores in float32, masked with finfo.min (a row with no allowed key averages every key). ``k``, ``v``
    may be tuples of blocks along the slots: the scores of each block are joined before the softmax."""
    k_blocks, v_blocks = (k, v) if isinstance(k, tuple) else ((k,), (v,))
    if isinstance(k_blocks[0], tuple):  # blocks split into row parts: each part's rows over its own arrays
        parts = len(k_blocks[0])
        return jnp.concatenate([
            _xla(q_part, tuple(kb[i] for kb in k_blocks), tuple(vb[i] for vb in v_blocks), valid_part, q_slots,
                 k_slots, sliding_window, scale=scale, softcap=softcap)
            for i, (q_part, valid_part) in enumerate(zip(row_parts_of(q, parts), row_parts_of(key_valid, parts)))],
            axis=0)
    b, t, n, d = q.shape
    kv_heads = k_blocks[0].shape[1]
    groups = n // kv_heads
    # One query per row (a decode step): each kv head's query groups are the rows of a plain [G, D] x [D, S] dot.
    # With the length axis between the batch axes XLA:CPU lays these dots out ~4x slower (batch 64, 96 slots).
    decode = t == 1
    if decode:
        q, score_eq, out_eq = q.reshape(b, kv_heads, groups, d), "bkgd,bksd->bkgs", "bkgs,bksd->bkgd"
    else:
        q, score_eq, out_eq = q.reshape(b, t, kv_heads, groups, d), "btkgd,bksd->bkgts", "bkgts,bksd->btkgd"
    scores = [jnp.einsum(score_eq, q, kb, preferred_element_type=jnp.float32) for kb in k_blocks]
    scores = scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)
    if decode:
        scores = scores[:, :, :, None, :]  # [B, K, G, T=1, S]
    scores = scores * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    allowed = _allowed(key_valid, q_slots, k_slots, sliding_window)  # [B, T, S]
    scores = jnp.where(allowed[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_blocks[0].dtype)
    if decode:
        probs = probs[:, :, :, 0, :]
    out, start = 0, 0
    for vb in v_blocks:
        width = vb.shape[2]
        out = out + jnp.einsum(out_eq, probs[..., start : start + width], vb)
        start += width
    return out.reshape(b, t, n, d)


def _allowed(key_valid, q_slots, k_slots, sliding_window):
    """[B, T, S] bool: which keys each query may attend to."""
    allowed = k_slots[None, :] <= q_slots[:, None]
    if sliding_window is not None:
        allowed &= (q_slots[:, None] - k_slots[None, :]) < sliding_window
    return allowed[None, :, :] & (key_valid[:, None, :] > 0)


# ----- chunked: online softmax in pure XLA ---------------------------------------------------------------
def chunked(q, k, v, key_valid, q_slots, k_slots, sliding_window=None, *, block_q: int | None = None,
            block_k: int | None = None, scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Flash-style attention in tiles of at most [block_q, block_k] (default :data:`BLOCK_Q`, :data:`BLOCK_K`);
    lengths need not divide the blocks (padded inside)."""
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    b, t, n, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    groups = n // kv_heads
    nq, nk = -(-t // block_q), -(-s // block_k)
    bq, bk = -(-t // nq), -(-s // nk)  # equal tiles, padded by less than one tile in all
    tp, sp = nq * bq, nk * bk
    window = jnp.asarray(NO_WINDOW if sliding_window is None else sliding_window, jnp.int32)
    q_slots = jnp.asarray(q_slots, jnp.int32)
    k_slots = jnp.asarray(k_slots, jnp.int32)
    # Fill rows (beyond T) see no key; fill keys (beyond S) are seen by no query and score -inf, so they
    # also stay out of the average a query with no allowed key takes.
    q_slots = jnp.pad(q_slots, (0, tp - t), constant_values=-1)
    k_slots = jnp.pad(k_slots, (0, sp - s), constant_values=NO_WINDOW)
    kcode = jnp.pad((key_valid > 0).astype(jnp.int32), ((0, 0), (0, sp - s)), constant_values=-1)
    qb = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, nq, bq, kv_heads, groups, d)
    qb = qb.transpose(1, 0, 3, 4, 2, 5)  # [nq, B, K, G, bq, D]
    kb = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0))).reshape(b, kv_heads, nk, bk, d).transpose(2, 0, 1, 3, 4)
    vb = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0))).reshape(b, kv_heads, nk, bk, d).transpose(2, 0, 1, 3, 4)
    scale = float(d**-0.5 if scale is None else scale)
    softcap = None if softcap is None else float(softcap)
    out = _flash(qb, kb, vb, kcode.reshape(b, nk, bk).transpose(1, 0, 2), q_slots.reshape(nq, bq),
                 k_slots.reshape(nk, bk), window, scale, softcap)  # [nq, B, K, G, bq, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, d)[:, :t]
    return out.astype(v.dtype)


def _tile_mask(qs, ks, kc, window):
    """(slot rule [bq, bk], allowed [B, 1, 1, bq, bk], fill value of a disallowed score [B, 1, 1, 1, bk])."""
    slot_ok = (ks[None, :] <= qs[:, None]) & ((qs[:, None] - ks[None, :]) < window)
    allowed = slot_ok[None] & (kc[:, None, :] > 0)
    fill = jnp.where(kc < 0, -jnp.inf, _NEG)
    return slot_ok, allowed[:, None, None], fill[:, None, None, None, :]


def _tile_scores(qi, kj, allowed, fill, scale, softcap=None):
    """(masked scores, tanh(raw / softcap) or None): the second is the backward's d(capped)/d(raw) = 1 - t^2."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    t = None
    if softcap is not None:
        t = jnp.tanh(s / softcap)
        s = t * softcap
    return jnp.where(allowed, s, fill), t


def _flash_forward(qb, kb, vb, kcode, qsb, ksb, window, scale, softcap):

    def q_block(args):
        qi, qs = args  # [B, K, G, bq, D], [bq]
        stats = qi.shape[:-1]

        def k_step(carry, xs):
            kj, vj, kc, ks = xs
            slot_ok, allowed, fill = _tile_mask(qs, ks, kc, window)

            def update(carry):
                m, l, acc = carry
                s, _ = _tile_scores(qi, kj, allowed, fill, scale, softcap)
                m_new = jnp.maximum(m, s.max(-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                l = alpha * l + p.sum(-1)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv

            return jax.lax.cond(jnp.any(slot_ok), update, lambda c: c, carry), None

        init = (jnp.full(stats, _NEG, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(k_step, init, (kb, vb, kcode, ksb))
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # inf: no key, no gradient
        return out.astype(qi.dtype), lse

    return jax.lax.map(q_block, (qb, qsb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))  # scale, softcap: Python floats
def _flash(qb, kb, vb, kcode, qsb, ksb, window, scale, softcap):
    return _flash_forward(qb, kb, vb, kcode, qsb, ksb, window, scale, softcap)[0]


def _flash_fwd(qb, kb, vb, kcode, qsb, ksb, window, scale, softcap):
    out, lse = _flash_forward(qb, kb, vb, kcode, qsb, ksb, window, scale, softcap)
    return out, (qb, kb, vb, kcode, qsb, ksb, window, out, lse)


def _flash_bwd(scale, softcap, res, g):
    """FlashAttention-2's backward: per key block, a pass over the query blocks recomputes each tile's
    probabilities from the log-sum-exp, accumulates dK, dV, and adds the tile's share to dQ. With a softcap,
    the score gradient also goes through d(cap * tanh(s / cap))/ds = 1 - tanh(s / cap)^2."""
    qb, kb, vb, kcode, qsb, ksb, window, out, lse = res
    g = g.astype(qb.dtype)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, B, K, G, bq]

    def k_block(dq, xs):
        kj, vj, kc, ks = xs

        def q_step(carry, ys):
            qi, gi, lse_i, delta_i, qs, dq_i = ys
            slot_ok, allowed, fill = _tile_mask(qs, ks, kc, window)

            def update(args):
                dk, dv, dq_i = args
                s, t = _tile_scores(qi, kj, allowed, fill, scale, softcap)
                p = jnp.exp(s - lse_i[..., None])
                dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(gi.dtype), gi, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", gi, vj, preferred_element_type=jnp.float32)
                ds = jnp.where(allowed, p * (dp - delta_i[..., None]), 0.0)
                if t is not None:
                    ds = ds * (1.0 - t * t)
                ds = ds * scale
                dq_i = dq_i + jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kj.dtype), kj,
                                         preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
                return dk, dv, dq_i

            dk, dv, dq_i = jax.lax.cond(jnp.any(slot_ok), update, lambda a: a, (*carry, dq_i))
            return (dk, dv), dq_i

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), (qb, g, lse, delta, qsb, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, kcode, ksb))
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----- cudnn: jax.nn.dot_product_attention -----------------------------------------------------------------
def dot_product(q, k, v, key_valid, q_slots, k_slots, sliding_window=None, *, implementation: str = "cudnn",
                scale: float | None = None):
    """``jax.nn.dot_product_attention`` with every rule in a boolean mask [B, 1, T, S]; self-attention
    (T == S: the slots are aligned) also passes ``is_causal`` and a static window as ``local_window_size``
    so cuDNN skips the tiles they exclude. ``implementation="xla"`` runs the same call on any backend."""
    t, s = q.shape[1], k.shape[2]
    mask = _allowed(key_valid, q_slots, k_slots, sliding_window)[:, None]
    self_attention = t == s
    local = None
    if self_attention and _is_static(sliding_window) and sliding_window is not None and sliding_window < NO_WINDOW:
        local = (int(sliding_window) - 1, 0)
    return jax.nn.dot_product_attention(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=mask, is_causal=self_attention,
        local_window_size=local, implementation=implementation, scale=scale,
    )


# ----- splash: the Pallas TPU kernel -------------------------------------------------------------------------
def _splash_block(t: int) -> int:
    return next(b for b in (512, 256, 128) if t % b == 0)


def _splash_kernel(heads: int, length: int, window: int | None, interpret: bool, softcap: float | None = None):
    """A kernel for this trace (its mask tables become arrays of the trace, so it is not cached)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), offset=0)
    blk = _splash_block(length)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret, attn_logits_soft_cap=softcap)


def _mesh_axes(mesh, size: int, names: tuple[str, ...]):
    """The mesh axes among ``names`` (size > 1) that together divide ``size``, or None."""
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def splash(q, k, v, key_valid, sliding_window=None, *, static_window: int | None = None,
           interpret: bool = False, scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Splash attention for self-attention (T == S, aligned slots, T a multiple of 128) -> [B, T, N, D].

    ``interpret=True`` runs the kernel in Pallas' interpreter (any backend; for tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from jax.sharding import PartitionSpec as P

    b, t, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, N, T, D]; the kernel does not scale
    seg = (key_valid > 0).astype(jnp.int32)  # pad 0, real 1: pads attend only to pads, never empty rows

    def run(window):
        def local(qh, k, v, seg):
            kernel = _splash_kernel(qh.shape[1], t, window, interpret, softcap)
            one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=s1, kv=s1))
            return jax.vmap(one)(qh, k, v.astype(qh.dtype), seg)

        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return local(qh, k, v, seg)
        batch = _mesh_axes(mesh, b, ("data", "fsdp"))
        heads = _mesh_axes(mesh, math.gcd(n, k.shape[1]), ("tensor",))
        spec = P(batch, heads)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch)), out_specs=spec,
                             check_vma=False)(qh, k, v, seg)

    if _is_static(sliding_window):
        window = None if sliding_window is None or sliding_window >= min(NO_WINDOW, t) else int(sliding_window)
        out = run(window)
    elif static_window is None or static_window >= t:
        out = run(None)  # traced, but no window of this model cuts this sequence
    else:
        out = jax.lax.cond(sliding_window >= NO_WINDOW, lambda: run(None), lambda: run(int(static_window)))
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)
