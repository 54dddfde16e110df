"""Attention implementations (jaxalign/models/attention.py) against softmax attention written here in float64
numpy: causal, left padding, sliding windows (static and traced), GQA, lengths that do not divide the
tiles, and the KV-cache case (offset query slots, more keys than queries). ``chunked``'s custom backward
against the gradient of ``xla``; a whole model with each implementation; the CLI's --attn_impl check.

``cudnn`` runs only on a GPU: its call (the mask, ``is_causal``, the window) is checked through the same
``jax.nn.dot_product_attention`` call with ``implementation="xla"``. ``splash`` runs only on a TPU: its
wrapper (scaling, segment ids, local masks, GQA heads) is checked with the Pallas interpreter; its TPU
compile is bench/splash_compile.py (needs libtpu).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY, cli_args, one_error_line, short_rows, write_jsonl
from jaxalign.cli import main
from jaxalign.config import OPTIONS
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.errors import ConfigError
from jaxalign.models import attention
from jaxalign.models.attention import NO_WINDOW, attend, check_impl, chunked, dot_product
from jaxalign.models.decoder import Attention, set_attn_impl
from jaxalign.models.kv_cache import init_cache

TOL = 1e-5


def reference(q, k, v, key_valid, q_slots, k_slots, window, scale=None, softcap=None):
    """softmax(q k^T / sqrt(D) over the allowed keys) v in float64, per row and head; NaN for a query with
    no allowed key (its output is unspecified, only finite). ``scale`` replaces 1/sqrt(D); ``softcap`` maps
    the scaled scores s to softcap * tanh(s / softcap) (Gemma 2)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, d = q.shape
    groups = n // k.shape[1]
    qs, ks = np.asarray(q_slots)[:, None], np.asarray(k_slots)[None, :]
    out = np.full(q.shape, np.nan)
    for row in range(b):
        allowed = (ks <= qs) & (np.asarray(key_valid)[row][None, :] > 0)
        if window is not None:
            allowed &= (qs - ks) < window
        for head in range(n):
            kv = head // groups
            for i in range(t):
                if not allowed[i].any():
                    continue
                s = k[row, kv][allowed[i]] @ q[row, i, head] * (1 / np.sqrt(d) if scale is None else scale)
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                out[row, i, head] = (p / p.sum()) @ v[row, kv][allowed[i]]
    return out


def inputs(b=3, t=37, s=None, n=4, kv=2, d=8, seed=0, pads=(0, 5, 30)):
    """q [B, T, N, D], k, v [B, K, S, D] and key_valid [B, S] with row r left-padded by pads[r]."""
    s = t if s is None else s
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, d)).astype(np.float32)
    k = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    v = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    valid = np.ones((b, s), np.int32)
    for row, p in enumerate(pads[:b]):
        valid[row, :p] = 0
    return q, k, v, valid


def check(out, ref):
    out = np.asarray(out)
    assert out.shape == ref.shape and np.isfinite(out).all()
    real = ~np.isnan(ref)
    assert real.any()
    np.testing.assert_allclose(out[real], ref[real], rtol=0, atol=TOL)


IMPLS = {
    "xla": lambda *a, **kw: attend(*a, impl="xla", **kw),
    "chunked": lambda *a, **kw: attend(*a, impl="chunked", **kw),
    # several tiles: 37 queries in tiles of <= 8, keys in tiles of <= 16 (neither divides)
    "chunked_tiles": lambda *a, sliding_window=None: chunked(*a, sliding_window, block_q=8, block_k=16),
    # the cudnn implementation's call, run by XLA
    "dot_product": lambda *a, sliding_window=None: dot_product(*a, sliding_window, implementation="xla"),
}


def run(fn, q, k, v, valid, q_slots, k_slots, window=None):
    """``fn`` under jax.jit, the window closed over (a Python int stays static)."""
    return jax.jit(lambda *a: fn(*a, sliding_window=window))(q, k, v, valid, q_slots, k_slots)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", ["causal", "left_padded", "window", "mqa"])
def test_equals_float64_reference(impl, case):
    pads = (0, 5, 30) if case in ("left_padded", "window") else (0, 0, 0)
    kv = 1 if case == "mqa" else 2
    window = 5 if case == "window" else None
    q, k, v, valid = inputs(pads=pads, kv=kv)
    slots = np.arange(q.shape[1])
    out = run(IMPLS[impl], q, k, v, valid, slots, slots, window)
    check(out, reference(q, k, v, valid, slots, slots, window))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_traced_window(impl):
    """The window as a traced int32 (a scanned layer's): a window, and NO_WINDOW meaning none."""
    q, k, v, valid = inputs()
    slots = np.arange(q.shape[1])
    fn = jax.jit(lambda w: IMPLS[impl](q, k, v, valid, slots, slots, sliding_window=w))
    check(fn(jnp.int32(6)), reference(q, k, v, valid, slots, slots, 6))
    check(fn(jnp.int32(NO_WINDOW)), reference(q, k, v, valid, slots, slots, None))


@pytest.mark.parametrize("impl", ["xla", "chunked", "chunked_tiles", "dot_product"])
@pytest.mark.parametrize("window", [None, 4])
def test_kv_cache_prefill_and_decode(impl, window):
    """Queries in slots 20.. over a 40-slot cache: rows left-padded, slots past the new tokens empty."""
    q, k, v, valid = inputs(t=7, s=40, pads=(0, 3, 22))
    valid[:, 27:] = 0  # not yet written
    q_slots = 20 + np.arange(7)
    k_slots = np.arange(40)
    check(run(IMPLS[impl], q, k, v, valid, q_slots, k_slots, window), reference(q, k, v, valid, q_slots, k_slots, window))
    one = q[:, :1]  # a decode step: one query in slot 26
    check(run(IMPLS[impl], one, k, v, valid, q_slots[-1:], k_slots, window),
          reference(one, k, v, valid, q_slots[-1:], k_slots, window))


@pytest.mark.parametrize("window", [None, 4])
def test_decode_step_over_cache_blocks(window):
    """A decode step's query (one per row, 2 query heads per kv head) over a per-layer cache's blocks of 16, 16
    and 8 slots, read in place: the float64 reference over the joined slots."""
    q, k, v, valid = inputs(t=1, s=40, pads=(0, 3, 22))
    valid[:, 31:] = 0  # not yet written
    q_slots, k_slots = np.array([30]), np.arange(40)
    blocks = lambda x: (x[:, :, :16], x[:, :, 16:32], x[:, :, 32:])
    out = jax.jit(lambda q, k, v: attend(q, k, v, valid, q_slots, k_slots, sliding_window=window, impl="xla"))(
        q, blocks(k), blocks(v))
    check(out, reference(q, k, v, valid, q_slots, k_slots, window))


# ----- soft-capping (Gemma 2) and a scale other than 1/sqrt(D) -------------------------------------------------
# The inputs' scores reach ~+-10 at this scale, so a cap of 2 changes every softmax a lot.
SCALE, CAP = 1.7, 2.0
SOFTCAP_IMPLS = {
    "xla": lambda *a, sliding_window=None: attend(*a, sliding_window=sliding_window, impl="xla", scale=SCALE,
                                                  softcap=CAP),
    "chunked": lambda *a, sliding_window=None: attend(*a, sliding_window=sliding_window, impl="chunked",
                                                      scale=SCALE, softcap=CAP),
    "chunked_tiles": lambda *a, sliding_window=None: chunked(*a, sliding_window, block_q=8, block_k=16, scale=SCALE,
                                                             softcap=CAP),
}


@pytest.mark.parametrize("impl", list(SOFTCAP_IMPLS))
@pytest.mark.parametrize("window", [None, 5])
def test_softcap_equals_float64_reference(impl, window):
    q, k, v, valid = inputs()
    slots = np.arange(q.shape[1])
    out = run(SOFTCAP_IMPLS[impl], q, k, v, valid, slots, slots, window)
    check(out, reference(q, k, v, valid, slots, slots, window, scale=SCALE, softcap=CAP))
    # the cap matters: without it the outputs are far apart
    uncapped = reference(q, k, v, valid, slots, slots, window, scale=SCALE)
    real = ~np.isnan(uncapped)
    assert np.abs(np.asarray(out)[real] - uncapped[real]).max() > 0.1


@pytest.mark.parametrize("impl", list(SOFTCAP_IMPLS))
def test_softcap_kv_cache_prefill_and_decode(impl):
    q, k, v, valid = inputs(t=7, s=40, pads=(0, 3, 22))
    valid[:, 27:] = 0
    q_slots, k_slots = 20 + np.arange(7), np.arange(40)
    check(run(SOFTCAP_IMPLS[impl], q, k, v, valid, q_slots, k_slots, 4),
          reference(q, k, v, valid, q_slots, k_slots, 4, scale=SCALE, softcap=CAP))
    one = q[:, :1]
    check(run(SOFTCAP_IMPLS[impl], one, k, v, valid, q_slots[-1:], k_slots, 4),
          reference(one, k, v, valid, q_slots[-1:], k_slots, 4, scale=SCALE, softcap=CAP))


@pytest.mark.parametrize("impl", ["chunked", "chunked_tiles"])
def test_softcap_chunked_gradients_equal_float64_autodiff(impl):
    """chunked's custom backward (through d(cap tanh(s/cap))/ds = 1 - tanh^2) against jax's autodiff of the
    plain full-score formula in float64."""
    q, k, v, valid = inputs(pads=(0, 5, 30))
    slots = np.arange(q.shape[1])
    weight = np.random.default_rng(3).normal(size=q.shape).astype(np.float32) * valid[:, :, None, None]
    got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(SOFTCAP_IMPLS[impl](q, k, v, valid, slots, slots,
                                                                       sliding_window=5) * weight), (0, 1, 2)))(q, k, v)
    with jax.enable_x64(True):
        def ref_attn(q, k, v):
            b, t, n, d = q.shape
            kvh = k.shape[1]
            qg = q.reshape(b, t, kvh, n // kvh, d)
            s = jnp.einsum("btkgd,bksd->bkgts", qg, k) * SCALE
            s = CAP * jnp.tanh(s / CAP)
            allowed = (slots[None, :] <= slots[:, None]) & ((slots[:, None] - slots[None, :]) < 5)
            allowed = allowed[None] & (valid[:, None, :] > 0)
            s = jnp.where(allowed[:, None, None], s, -1e30)  # rows with no key: weight 0 below
            out = jnp.einsum("bkgts,bksd->btkgd", jax.nn.softmax(s, axis=-1), v)
            return out.reshape(b, t, n, d)

        ref = jax.grad(lambda q, k, v: jnp.sum(ref_attn(q, k, v) * weight), (0, 1, 2))(
            *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
        ref = [np.asarray(r) for r in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=TOL)


def test_softcap_splash_in_the_pallas_interpreter():
    """splash passes the cap to the kernel (attn_logits_soft_cap) and scales q by ``scale`` itself."""
    q, k, v, valid = inputs(b=1, t=128, pads=(0,))
    slots = np.arange(128)
    out = jax.jit(lambda q, k, v: attention.splash(q, k, v, valid, 17, interpret=True, scale=SCALE, softcap=CAP))(
        q, k, v)
    check(out, reference(q, k, v, valid, slots, slots, 17, scale=SCALE, softcap=CAP))


def test_cudnn_with_softcap_runs_chunked():
    """cuDNN attention cannot soft-cap: ``cudnn`` (and ``auto`` on a GPU) take ``chunked`` when a cap is set."""
    q, k, v, valid = inputs(t=16, pads=(0, 3, 8))
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    slots = np.arange(16)
    got = jax.jit(lambda q, k, v: attend(q, k, v, valid, slots, slots, impl="cudnn", scale=SCALE, softcap=CAP))(q, k, v)
    want = jax.jit(lambda q, k, v: attend(q, k, v, valid, slots, slots, impl="chunked", scale=SCALE,
                                          softcap=CAP))(q, k, v)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_row_with_no_allowed_key_is_finite():
    """A left-pad query sees only pad keys: xla keeps today's uniform average over the keys; every
    implementation stays finite, and so do the gradients through it."""
    q, k, v, valid = inputs(pads=(37, 5, 30))  # row 0 all padding
    slots = np.arange(37)
    out = np.asarray(run(IMPLS["xla"], q, k, v, valid, slots, slots))
    np.testing.assert_allclose(out[0, :, 0], np.broadcast_to(v[0, 0].mean(0), (37, 8)), atol=TOL)
    for fn in (IMPLS["chunked"], IMPLS["chunked_tiles"], IMPLS["dot_product"]):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, valid, slots, slots) ** 2)  # noqa: E731
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("blocks,window,pads", [((None, None), None, (0, 5, 30)), ((8, 16), None, (0, 5, 30)),
                                                ((8, 16), 6, (0, 5, 30)), ((8, 8), 3, (2, 0, 9))])
def test_chunked_gradients_equal_xla(blocks, window, pads):
    """d/d(q, k, v) of a loss over the real rows (a padded row's output feeds nothing in the model)."""
    q, k, v, valid = inputs(pads=pads)
    slots = np.arange(q.shape[1])
    weight = np.random.default_rng(1).normal(size=q.shape).astype(np.float32) * valid[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)

    xla = jax.jit(jax.grad(loss(lambda q, k, v: attend(q, k, v, valid, slots, slots, sliding_window=window,
                                                       impl="xla")), argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda q, k, v: chunked(q, k, v, valid, slots, slots, window, block_q=blocks[0],
                                                        block_k=blocks[1])), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=TOL)


def test_chunked_gradient_through_remat_and_cache_slots():
    """Under jax.checkpoint (the model's remat), with offset query slots (S > T)."""
    q, k, v, valid = inputs(t=9, s=30, pads=(0, 4, 12))
    q_slots, k_slots = 21 + np.arange(9), np.arange(30)

    def loss(fn):
        return jax.checkpoint(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))))

    xla = jax.jit(jax.grad(loss(lambda q, k, v: attend(q, k, v, valid, q_slots, k_slots, impl="xla")),
                           (0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda q, k, v: chunked(q, k, v, valid, q_slots, k_slots, block_q=4, block_k=8)),
                           (0, 1, 2)))(q, k, v)
    for a, b in zip(got, xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=TOL)


def test_chunked_never_builds_the_score_matrix():
    """Forward + backward at 2048 tokens: no array in the optimised program has a [2048, 2048] tile, and the
    temporaries are under a quarter of xla's."""
    t = 2048
    q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 1, t, 16), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, t), jnp.int32)
    slots = jax.ShapeDtypeStruct((t,), jnp.int32)

    def compiled(impl):
        def loss(q, k, v, valid, slots):
            return jnp.sum(attend(q, k, v, valid, slots, slots, impl=impl))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, valid, slots).compile()

    chunked_, xla = compiled("chunked"), compiled("xla")
    assert f"{t},{t}]" not in chunked_.as_text()
    assert f"{t},{t}]" in xla.as_text()  # where the check would see them
    assert chunked_.memory_analysis().temp_size_in_bytes < xla.memory_analysis().temp_size_in_bytes / 4


def test_chunked_in_bfloat16():
    """The GPU/TPU fallback runs in bfloat16: outputs within bfloat16 rounding of the float64 reference, and
    gradients (bfloat16, as the inputs) within rounding of xla's."""
    q, k, v, valid = inputs()
    slots = np.arange(q.shape[1])
    ref = reference(q, k, v, valid, slots, slots, 6)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    fns = {"xla": lambda q, k, v: attend(q, k, v, valid, slots, slots, sliding_window=6, impl="xla"),
           "chunked": lambda q, k, v: chunked(q, k, v, valid, slots, slots, 6, block_q=8, block_k=16)}
    out = jax.jit(fns["chunked"])(qb, kb, vb)
    assert out.dtype == jnp.bfloat16
    real = ~np.isnan(ref)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[real], ref[real], rtol=0, atol=3e-2)
    weight = valid[:, :, None, None].astype(np.float32)
    grads = {name: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weight),
                                    (0, 1, 2)))(qb, kb, vb) for name, fn in fns.items()}
    for a, b in zip(grads["chunked"], grads["xla"]):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()


# ----- splash (Pallas interpreter) ---------------------------------------------------------------------------
def test_splash_wrapper_in_the_pallas_interpreter():
    """128 tokens, 4 query heads over 2, left padding, a static and a traced window; the gradient too."""
    q, k, v, valid = inputs(b=2, t=128, pads=(0, 50))
    slots = np.arange(128)
    static = jax.jit(lambda q, k, v: attention.splash(q, k, v, valid, 17, interpret=True))
    check(static(q, k, v), reference(q, k, v, valid, slots, slots, 17))
    traced = jax.jit(lambda w: attention.splash(q, k, v, valid, w, static_window=17, interpret=True))
    check(traced(jnp.int32(NO_WINDOW)), reference(q, k, v, valid, slots, slots, None))
    weight = valid[:, :, None, None].astype(np.float32)
    got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(static(q, k, v) * weight), (0, 1, 2)))(q, k, v)
    xla = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, valid, slots, slots, sliding_window=17,
                                                          impl="xla") * weight), (0, 1, 2)))(q, k, v)
    for a, b in zip(got, xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=TOL)


def test_splash_under_shard_map_on_a_mesh():
    """With a context mesh the kernel runs per shard: rows over fsdp, query and key/value heads over tensor."""
    q, k, v, valid = inputs(b=2, t=128, pads=(0, 70))
    slots = np.arange(128)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attention.splash(q, k, v, valid, None, interpret=True))(q, k, v)
        jaxpr = jax.make_jaxpr(lambda q: attention.splash(q, k, v, valid, interpret=True))(q)
    assert "shard_map" in jaxpr.pretty_print()
    check(out, reference(q, k, v, valid, slots, slots, None))


# ----- choosing ----------------------------------------------------------------------------------------------
def _shapes(t, s, dtype=jnp.float32, d=64):
    return jax.ShapeDtypeStruct((2, t, 8, d), dtype), jax.ShapeDtypeStruct((2, 4, s, d), dtype)


def test_auto_on_cpu_by_length_and_fallbacks():
    assert jax.default_backend() == "cpu"
    m = attention.CHUNKED_MIN_KEYS
    assert attention._resolve("auto", *_shapes(64, 64)) == "xla"
    assert attention._resolve("auto", *_shapes(m, m)) == "chunked"
    assert attention._resolve("auto", *_shapes(1, 4 * m)) == "xla"  # a decode step
    assert attention._resolve("splash", *_shapes(100, 100)) == "chunked"  # not a multiple of 128
    assert attention._resolve("splash", *_shapes(16, 256)) == "chunked"  # a cache prefill
    # Mosaic kernels are not partitioned automatically: splash needs one device or a mesh to shard_map over
    one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(one):
        assert attention._resolve("splash", *_shapes(256, 256)) == "splash"
    assert attention._resolve("splash", *_shapes(256, 256)) == ("splash" if jax.device_count() == 1 else "chunked")
    assert attention._resolve("cudnn", *_shapes(63, 63, jnp.bfloat16)) == "chunked"  # odd lengths
    with pytest.raises(ConfigError, match="--attn_impl cudnn: .* needs bfloat16 or float16"):
        attention._resolve("cudnn", *_shapes(64, 64))


def test_check_impl_names_the_device_it_needs():
    assert check_impl("chunked", "cpu") == "chunked" and check_impl("splash", "tpu") == "splash"
    with pytest.raises(ConfigError, match=r"^--attn_impl cudnn needs a GPU \(these devices are cpu\)"):
        check_impl("cudnn", "cpu")
    with pytest.raises(ConfigError, match=r"^--attn_impl splash needs a TPU \(these devices are gpu\)"):
        check_impl("splash", "gpu")
    assert OPTIONS["attn_impl"].choices == attention.IMPLS


# ----- a whole model -------------------------------------------------------------------------------------------
def _model(sliding_window=None):
    cfg = llama_config(61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64)
    return random_model(dataclasses.replace(cfg, sliding_window=sliding_window), seed=3)


def _forwards(model, ids, mask):
    """(full-forward logits, prefill logits of the first 18 tokens, the 19th token's logits from the cache)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        m = nnx.merge(graphdef, state)
        prefill, cache = m(ids[:, :18], mask[:, :18], cache=init_cache(m.config, ids.shape[0], 32))
        step, _ = m(ids[:, 18:19], mask[:, 18:19], cache=cache)
        return m(ids, mask), prefill, step

    return run(state, ids, mask)


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_model_logits_equal_across_implementations(monkeypatch, sliding_window):
    """A tiny model on left- and right-padded rows: chunked (in 8 x 8 tiles) equals xla to 1e-5 on every real
    token, in a full forward and in prefill + decode through the KV cache."""
    monkeypatch.setattr(attention, "BLOCK_Q", 8)
    monkeypatch.setattr(attention, "BLOCK_K", 8)
    model = _model(sliding_window)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 61, size=(3, 21)))
    mask = np.ones((3, 21), np.int32)
    mask[1, :6] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    mask = jnp.asarray(mask)
    got = {}
    for impl in ("xla", "chunked"):
        set_attn_impl(model, impl)
        assert {n.attn_impl for _, n in nnx.iter_graph(model) if isinstance(n, Attention)} == {impl}
        got[impl] = [np.asarray(x) for x in _forwards(model, ids, mask)]
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(got["chunked"][0][real], got["xla"][0][real], rtol=0, atol=TOL)
    np.testing.assert_allclose(got["chunked"][1][real[:, :18]], got["xla"][1][real[:, :18]], rtol=0, atol=TOL)
    np.testing.assert_allclose(got["chunked"][2], got["xla"][2], rtol=0, atol=TOL)
    # and the full forward agrees with the cached one (the same attention, two call patterns)
    np.testing.assert_allclose(got["chunked"][1][real[:, :18]], got["chunked"][0][:, :18][real[:, :18]], atol=TOL)


def test_set_attn_impl_refuses_unknown_names():
    with pytest.raises(ValueError, match="'flash'"):
        set_attn_impl(_model(), "flash")


# ----- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["sft", "--dataset", "d.jsonl"], ["infer", "--prompt", "hi"]])
def test_bad_attn_impl_is_one_line_and_exit_2(capsys, command):
    capsys.readouterr()
    rc = main([command[0], "--model", "m", *command[1:], "--attn_impl", "flash"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--attn_impl" in line and "'flash'" in line
    assert "auto, xla, chunked, cudnn, splash" in line or "'auto', 'xla', 'chunked', 'cudnn', 'splash'" in line


def test_cudnn_on_cpu_is_one_line_and_exit_2(capsys, tmp_path, tiny_model_dir):
    """The trainer checks the choice against the mesh's devices before compiling anything."""
    data = write_jsonl(tmp_path / "train.jsonl", short_rows(8))
    capsys.readouterr()
    rc = main(["sft", "--model", tiny_model_dir, "--dataset", data, "--output_dir", str(tmp_path / "out"),
               "--attn_impl", "cudnn", *cli_args({**TINY, "max_steps": 1})])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == ("jaxalign: error: --attn_impl cudnn needs a GPU (these devices are cpu); "
                                "use auto, xla or chunked")
