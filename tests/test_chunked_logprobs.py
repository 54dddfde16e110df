"""Log-probs without full logits (issue 16, part 3): the chunked LM head gives the log-probs, entropies,
vocabulary-mean logits and argmaxes of a float64 numpy log-softmax over explicitly materialised logits,
for sequence lengths that are not a multiple of the chunk, at temperature != 1, with tied and untied
heads; its gradients equal those of the unchunked formulation; and a compiled DPO loss holds no
[B, T, V] array."""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import resolve
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.parallel.mesh import make_mesh
from jaxalign.parallel.rules import batch_sharding, param_shardings
from jaxalign.trainers.logprobs import completion_logps, head_chunk_len, head_stats, token_stats
from jaxalign.trainers.preference import PairPreference


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def np_stats(logits: np.ndarray, targets: np.ndarray, temperature: float):
    """(target log-prob, entropy, vocabulary-mean raw logit, argmax) per position, in float64."""
    logits = np.asarray(logits, np.float64)
    logp = np_log_softmax(logits / temperature)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, -(np.exp(logp) * logp).sum(-1), logits.mean(-1), logits.argmax(-1)


def tiny(tied: bool, vocab: int = 61, seed: int = 0):
    cfg = llama_config(vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=tied)
    return random_model(cfg, seed=seed)


def random_batch(b: int, t: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    attn = np.ones((b, t), np.int32)
    attn[0, -5:] = 0  # some padding
    return ids, attn


@pytest.mark.parametrize("chunk_len", [None, 1, 8, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_stats_equal_float64_log_softmax(chunk_len, temperature):
    rng = np.random.default_rng(1)
    b, t, h, v = 3, 37, 16, 50  # 37 positions: no chunk length above divides them
    hidden = rng.normal(size=(b, t, h)).astype(np.float32)
    w = rng.normal(size=(h, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    out = head_stats(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(targets), temperature=temperature,
                     entropy=True, mean_logits=True, argmax=True, chunk_len=chunk_len)
    lp, ent, mean, top = np_stats(hidden.astype(np.float64) @ w.astype(np.float64), targets, temperature)
    for got, want in ((out.logps, lp), (out.entropy, ent), (out.mean_logits, mean)):
        assert got.shape == (b, t) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.argmax), top)


def test_chunk_length_rule():
    assert head_chunk_len(64, 69) == 64  # the demo: one chunk
    assert head_chunk_len(4096, 128256) == 256
    assert head_chunk_len(32, 128256) == 32  # 32 x 128256 = 2^22 - ..., still one chunk
    assert head_chunk_len(100, 1000, 30) == 30
    assert head_chunk_len(10, 1000, 30) == 10


@pytest.mark.parametrize("tied", [True, False])
def test_token_stats_and_completion_logps_equal_materialised_logits(tied):
    model = tiny(tied)
    v = model.config.vocab_size
    ids, attn = random_batch(3, 23, v, seed=2)
    graphdef, state = nnx.split(model)
    prompt_len, temperature = 9, 0.8  # 14 completion positions, chunks of 4

    @jax.jit
    def run(state, ids, attn):
        m = nnx.merge(graphdef, state)
        return (m(ids, attn), token_stats(m, ids, attn, mean_logits=True, argmax=True, chunk_len=5),
                completion_logps(m, ids, attn, prompt_len, temperature, chunk_len=4))

    full, out, (clp, cent) = run(state, jnp.asarray(ids), jnp.asarray(attn))
    # explicitly materialised logits: the model's plain forward, [B, T, V]
    logits = np.asarray(full, np.float64)
    lp, _, mean, top = np_stats(logits[:, :-1], ids[:, 1:], 1.0)
    np.testing.assert_allclose(np.asarray(out.logps[:, 1:]), lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.logps[:, 0]), 0.0)
    np.testing.assert_allclose(np.asarray(out.mean_logits), logits.mean(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.argmax[:, :-1]), top)
    np.testing.assert_array_equal(np.asarray(out.argmax[:, -1]), logits[:, -1].argmax(-1))

    lp, ent, _, _ = np_stats(logits[:, prompt_len - 1 : -1], ids[:, prompt_len:], temperature)
    np.testing.assert_allclose(np.asarray(clp), lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cent), ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_equal_the_unchunked_formulation(tied):
    model = tiny(tied, seed=3)
    v = model.config.vocab_size
    ids, attn = random_batch(2, 19, v, seed=4)
    ids, attn = jnp.asarray(ids), jnp.asarray(attn)
    rng = np.random.default_rng(5)
    wl, we, wm = (jnp.asarray(rng.normal(size=(2, n)), jnp.float32) for n in (19, 18, 19))
    graphdef, params = nnx.split(model)
    prompt_len, temperature = 1, 0.7

    def chunked(p):
        m = nnx.merge(graphdef, p)
        out = token_stats(m, ids, attn, mean_logits=True, chunk_len=4)
        _, ent = completion_logps(m, ids, attn, prompt_len, temperature, chunk_len=4)
        return jnp.sum(wl * out.logps) + jnp.sum(we * ent) + jnp.sum(wm * out.mean_logits)

    def unchunked(p):  # the full [B, T, V] logits, as the trainers computed them before
        logits = nnx.merge(graphdef, p)(ids, attn)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        tlp = jnp.pad(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0], ((0, 0), (1, 0)))
        logp_t = jax.nn.log_softmax(logits[:, prompt_len - 1 : -1] / temperature, axis=-1)
        ent = -jnp.sum(jnp.exp(logp_t) * logp_t, axis=-1)
        return jnp.sum(wl * tlp) + jnp.sum(we * ent) + jnp.sum(wm * jnp.mean(logits, axis=-1))

    got_v, got = jax.jit(jax.value_and_grad(chunked))(params)
    want_v, want = jax.jit(jax.value_and_grad(unchunked))(params)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = jax.tree_util.tree_leaves_with_path(want)
        ref = dict((jax.tree_util.keystr(p), x) for p, x in w)[jax.tree_util.keystr(path)]
        assert float(jnp.max(jnp.abs(ref))) > 0, path
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-5, err_msg=str(path))


def compiled_dpo_loss_shapes(tmp_path, pairs: int, t: int, v: int, mesh=None) -> set[tuple[int, ...]]:
    """The array shapes in the compiled value and gradient of the DPO trainer's loss (policy and reference in
    the step) for ``pairs`` pairs of ``t`` tokens over a ``v``-word vocabulary; under ``mesh`` (fsdp) with
    the parameters and the batch sharded as the trainer shards them, traced under ``jax.set_mesh``."""
    model = random_model(llama_config(v, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False))
    cfg = resolve("rlhf", None, dict(rlhf_type="dpo", model=str(tmp_path), dataset=str(tmp_path / "x.jsonl"),
                                     output_dir=str(tmp_path / "out"), mesh="data=1,fsdp=1,tensor=1"))
    algo = PairPreference(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    algo._graphdef, algo._rest = graphdef, rest
    ids = jax.ShapeDtypeStruct((pairs, t), jnp.int32, sharding=batch_sharding(mesh) if mesh is not None else None)
    batch = {f"{side}_{k}": ids for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask")}

    def loss(p, ref, micro):
        totals = algo.totals_fn(micro)
        return algo.loss_fn(nnx.merge(graphdef, p, rest), micro, totals, ref, None)

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    if mesh is not None:
        abstract = jax.tree.map(lambda sh, x: jax.tree.map(lambda y: jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=sh), x),
                                param_shardings(params, mesh), abstract)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        text = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(abstract, abstract, batch).compile().as_text()
    return {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\b[a-z]+\d*\[([\d,]+)\]", text)}


def test_compiled_dpo_loss_holds_no_batch_by_tokens_by_vocab_array(tmp_path):
    """Compiled at T x V above the single-chunk size: no array, float32 or other, holds the logits of all
    positions (the previous path held f32[2, 600, 8192] and f32[2, 599, 8192])."""
    t, v = 600, 8192  # 600 x 8192 logits per row > SINGLE_CHUNK_ELEMENTS
    assert head_chunk_len(t, v) < t
    shapes = compiled_dpo_loss_shapes(tmp_path, 1, t, v)
    full = [s for s in shapes if v in s and int(np.prod(s)) >= (t - 1) * v]
    assert not full, f"arrays of all positions' logits in the compiled DPO loss: {sorted(full)}"
    assert any(v in s for s in shapes)  # the head is in there, in chunks


def test_sharded_chunks_hold_each_devices_own_rows(tmp_path):
    """On 8 devices (fsdp=8), 8 pairs = 16 rows, 2 per device: every array of the head's logits holds at most
    one device's rows of one chunk (2 x 256 x V), never the global batch's chunk (16 x 256 x V). With nothing
    pinning the batch (no activation constraint or weight gather, before issue 16 part 1 and the chunk loop's
    constraint) XLA computed every chunk for all 16 rows on every device."""
    t, v = 600, 8192
    mesh = make_mesh("data=1,fsdp=8,tensor=1", devices=jax.devices()[:8])
    shapes = compiled_dpo_loss_shapes(tmp_path, 8, t, v, mesh)
    big = [s for s in shapes if v in s and int(np.prod(s)) > 2 * head_chunk_len(t, v) * v]
    assert not big, f"arrays of more than one device's rows of a chunk: {sorted(big)}"
    assert any(v in s and int(np.prod(s)) == 2 * head_chunk_len(t, v) * v for s in shapes)
