"""The pure-JAX sampler against transformers' greedy generate and against the math of sampling."""

from __future__ import annotations

import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import FAMILIES, save_hf_model_dir
from jaxalign.convert import load_hf_model
from jaxalign.models import Decoder, ModelConfig
from jaxalign.rollout import apply_repetition_penalty, generate, trace_count

PAD = 0


def left_padded(lengths, vocab, seed=0, width=None):
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(3, vocab, n)
        mask[i, width - n:] = 1
    return ids, mask


def hf_greedy(hf, ids, mask, n_new, eos, **kw):
    """transformers' greedy generate; finished rows padded with PAD, output widened to n_new."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=n_new, pad_token_id=PAD, eos_token_id=eos, **kw,
        )[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, n_new - out.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers(family, tmp_path):
    hf = save_hf_model_dir(family, tmp_path, seed=1)
    hf.generation_config.eos_token_id = None
    model = load_hf_model(tmp_path)
    n_new = 10
    ids, mask = left_padded([6, 9, 2, 4], 97, seed=3)
    free = hf_greedy(hf, ids, mask, n_new, eos=None)
    stop = int(free[0, 2])  # a token row 0 emits third: row 0 must stop early
    ref = hf_greedy(hf, ids, mask, n_new, eos=stop)

    out = generate(model, ids, mask, max_new_tokens=n_new, temperature=0.0, stop_token_ids=(stop,), rng=0)
    tokens, lengths, finished = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.finished)
    hits = ref == stop
    want_len = np.where(hits.any(1), hits.argmax(1) + 1, n_new)
    assert want_len[0] <= 3 and finished[0]
    np.testing.assert_array_equal(lengths, want_len)
    np.testing.assert_array_equal(finished, hits.any(1))
    np.testing.assert_array_equal(np.asarray(out.mask), np.arange(n_new)[None] < want_len[:, None])
    for i in range(len(ids)):  # token for token up to each row's stop, pad after
        np.testing.assert_array_equal(tokens[i, : want_len[i]], ref[i, : want_len[i]], err_msg=f"row {i}")
        assert (tokens[i, want_len[i]:] == PAD).all()
    assert int(out.steps) == want_len.max()


@pytest.fixture
def weights_sliced_in_loop(monkeypatch):
    """The sampler as it runs on an accelerator: each decode step reads the layer weights out of the stacked
    parameters, instead of CPU's copies taken once before the loop (``slices_weights_once``)."""
    generate_module = importlib.import_module("jaxalign.rollout.generate")  # the package exports the function

    monkeypatch.setattr(generate_module, "slices_weights_once", lambda mesh: False)
    generate_module._compiled.cache_clear()  # a sampler traced the CPU way must not be reused
    yield
    generate_module._compiled.cache_clear()


@pytest.fixture
def one_row_per_part(monkeypatch):
    """The decode's per-layer cache split into one row part per row (CPU splits 16 rows or more in 2)."""
    generate_module = importlib.import_module("jaxalign.rollout.generate")

    monkeypatch.setattr(generate_module, "decode_row_parts", lambda mesh, rows: rows)
    generate_module._compiled.cache_clear()
    yield
    generate_module._compiled.cache_clear()


@pytest.mark.parametrize("family,overrides,weights", [("llama", {}, "sliced once"), ("mistral", dict(sliding_window=24),
                         "sliced once"), ("llama", {}, "sliced in the loop"), ("llama", {}, "rows in parts"),
                         ("mistral", dict(sliding_window=24), "rows in parts")])
def test_greedy_over_decode_phases_equals_transformers(family, overrides, weights, tmp_path, request):
    """70 new tokens decode in three phases (cache blocks ending at P+32, P+64, P+70; each phase attends only to
    the blocks so far): greedy tokens equal transformers' for every position, past the sliding window too, and
    each sampled token's log-prob equals log-softmax of one full forward over prompt + completion. Both ways of
    reading the layer weights: sliced once before the loop (CPU) and out of the stack at every step; and with the
    cache's blocks split into row parts (here one row each)."""
    from jaxalign.rollout.generate import decode_read_bounds

    if weights == "sliced in the loop":
        request.getfixturevalue("weights_sliced_in_loop")
    if weights == "rows in parts":
        request.getfixturevalue("one_row_per_part")
    hf = save_hf_model_dir(family, tmp_path, seed=2, **overrides)
    hf.generation_config.eos_token_id = None
    model = load_hf_model(tmp_path)
    n_new = 70
    ids, mask = left_padded([5, 9, 3], 97, seed=5)
    assert decode_read_bounds(9, n_new) == (9 + 32, 9 + 64, 9 + 70)
    ref = hf_greedy(hf, ids, mask, n_new, eos=None)
    out = generate(model, ids, mask, max_new_tokens=n_new, temperature=0.0, stop_token_ids=(), rng=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.steps) == n_new
    with torch.no_grad():
        full = torch.cat([torch.tensor(ids, dtype=torch.long), torch.tensor(ref, dtype=torch.long)], 1)
        full_mask = torch.cat([torch.tensor(mask, dtype=torch.long), torch.ones(ref.shape, dtype=torch.long)], 1)
        logits = hf(full, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1].double()
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ref, dtype=torch.long)[..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(out.logps), want.numpy(), atol=2e-4)


# A tiny model built directly, with logits scaled up so that the next-token law is far from uniform.
TINY = ModelConfig(model_type="llama", vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def tiny():
    model = Decoder(TINY, rngs=nnx.Rngs(7))
    model.lm_head[...] = model.lm_head[...] * 60.0
    return model


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_sampling_matches_softmax(tiny):
    """8192 draws of the first token: total variation to softmax(logits) within a bound from the sample size.

    E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) (Jensen), and TV - E[TV] <= sqrt(ln(1/delta) / (2n)) with
    probability 1 - delta (McDiarmid: one draw moves TV by at most 1/n); delta = 1e-6.
    """
    prompt = np.array([[5, 9, 3, 12]], np.int32)
    n = 8192
    out = generate(tiny, prompt, np.ones_like(prompt), max_new_tokens=1, temperature=1.0,
                   num_return_sequences=n, stop_token_ids=(), rng=jax.random.key(11))
    p = softmax64(tiny(jnp.asarray(prompt))[0, -1])
    assert p.max() > 0.2  # a far-from-uniform law
    emp = np.bincount(np.asarray(out.tokens[:, 0]), minlength=16) / n
    bound = 0.5 * np.sum(np.sqrt(p * (1 - p) / n)) + math.sqrt(math.log(1e6) / (2 * n))
    tv = 0.5 * np.abs(emp - p).sum()
    assert tv < bound, (tv, bound)
    # The test has power: the law at temperature 2 is far outside the bound.
    wrong = softmax64(np.log(p) / 2)
    assert 0.5 * np.abs(wrong - p).sum() > 3 * bound
    assert 0.5 * np.abs(emp - wrong).sum() > bound


def _full_forward_logits(model, prompt_ids, prompt_mask, out):
    """Fresh full-sequence forward over prompt + response; logits predicting each response token."""
    n = len(out.tokens) // len(prompt_ids)
    ids = np.concatenate([np.repeat(prompt_ids, n, 0), np.asarray(out.tokens)], 1)
    mask = np.concatenate([np.repeat(prompt_mask, n, 0), np.asarray(out.mask)], 1)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    p = prompt_ids.shape[1]
    return np.asarray(logits[:, p - 1: -1], np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.7)])
def test_top_k_top_p_support_and_logps(tiny, top_k, top_p):
    temperature = 0.8
    ids, mask = left_padded([4, 7, 2, 5], 16, seed=5)
    stop = int(np.argmax(tiny(jnp.asarray(ids), jnp.asarray(mask))[1, -1]))  # likely first token of row 1
    out = generate(tiny, ids, mask, max_new_tokens=5, temperature=temperature, top_k=top_k, top_p=top_p,
                   num_return_sequences=64, stop_token_ids=(stop,), rng=jax.random.key(3))
    logits = _full_forward_logits(tiny, ids, mask, out)  # [R, 5, V]
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
    assert m.sum() > 300 and (~m).sum() > 0  # sampled plenty, and some rows stopped early
    scaled = logits / temperature
    # Allowed set, worked out in numpy: top-k by value, then the nucleus of the renormalised rest.
    allowed = np.ones_like(scaled, bool)
    if top_k:
        kth = np.sort(scaled, -1)[..., -top_k][..., None]
        allowed &= scaled >= kth
    if top_p < 1:
        probs = softmax64(np.where(allowed, scaled, -np.inf))
        order = np.argsort(-probs, -1)
        sp = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sp, -1) - sp
        keep_sorted = before < top_p + 1e-6
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        allowed &= keep
    assert allowed.sum(-1).min() < 16  # the filter binds
    picked = np.take_along_axis(allowed, tokens[..., None], -1)[..., 0]
    assert picked[m].all(), "a token outside the top-k/top-p set was sampled"
    assert len(np.unique(tokens[m])) > 2
    # logps: log softmax(raw logits / T) of the sampled token, from a fresh full forward.
    want = np.take_along_axis(_log_softmax(scaled), tokens[..., None], -1)[..., 0]
    got = np.asarray(out.logps)
    np.testing.assert_allclose(got[m], want[m], atol=1e-4)
    assert (got[~m] == 0).all() and (tokens[~m] == PAD).all()


def test_repetition_penalty_rule():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 11)).astype(np.float32) * 3
    seen_ids = [[1, 4, 4, 7], [0], [2, 3, 5, 6, 10]]
    seen = np.zeros((3, 11), bool)
    want = logits.astype(np.float64).copy()
    for b, ids in enumerate(seen_ids):  # HF RepetitionPenaltyLogitsProcessor, written out
        for t in set(ids):
            seen[b, t] = True
            want[b, t] = logits[b, t] * 1.7 if logits[b, t] < 0 else logits[b, t] / 1.7
    got = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.7))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (got != logits).sum() == seen.sum()


def test_repetition_penalty_equals_transformers(tmp_path):
    hf = save_hf_model_dir("llama", tmp_path, seed=2)
    hf.generation_config.eos_token_id = None
    model = load_hf_model(tmp_path)
    ids, mask = left_padded([6, 6], 97, seed=9)  # unpadded: HF also penalises pad tokens of padded prompts
    ids[0, 3:] = ids[0, :3]  # repeats in the prompt
    ref = hf_greedy(hf, ids, mask, 12, eos=None, repetition_penalty=1.8)
    plain = hf_greedy(hf, ids, mask, 12, eos=None)
    assert (ref != plain).any()  # the penalty changes the greedy path
    out = generate(model, ids, mask, max_new_tokens=12, temperature=0.0, repetition_penalty=1.8,
                   stop_token_ids=(), rng=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_num_return_sequences_greedy_copies(tiny):
    ids, mask = left_padded([3, 6, 5], 16, seed=2)
    one = generate(tiny, ids, mask, max_new_tokens=6, temperature=0.0, stop_token_ids=(), rng=0)
    three = generate(tiny, ids, mask, max_new_tokens=6, temperature=0.0, stop_token_ids=(), rng=0,
                     num_return_sequences=3)
    np.testing.assert_array_equal(np.asarray(three.tokens), np.repeat(np.asarray(one.tokens), 3, 0))
    np.testing.assert_allclose(np.asarray(three.logps), np.repeat(np.asarray(one.logps), 3, 0), atol=1e-5)


def test_no_retrace_and_early_stop(tiny):
    ids, mask = left_padded([3, 6, 5, 2], 16, seed=4)
    n_new = 16
    no_stop = np.full((4, 2), -1, np.int32)
    first = generate(tiny, ids, mask, max_new_tokens=n_new, temperature=0.0, stop_token_ids=no_stop, rng=0)
    assert int(first.steps) == n_new and not np.asarray(first.finished).any()
    traces = trace_count()
    # Per-row stop tokens: each row stops at its own third token; a different stop set, same shapes.
    toks = np.asarray(first.tokens)
    stops = np.full((4, 2), -1, np.int32)
    stops[:, 0] = toks[:, 2]
    fresh = nnx.merge(*nnx.split(tiny))  # a trainer's freshly merged policy: same graph, no retrace
    out = generate(fresh, ids + 0, mask, max_new_tokens=n_new, temperature=0.0, stop_token_ids=stops, rng=1)
    assert trace_count() == traces, "a repeat call with the same shapes retraced"
    assert np.asarray(out.finished).all()
    lengths = np.asarray(out.lengths)
    want = np.array([list(toks[i]).index(toks[i, 2]) + 1 for i in range(4)])
    np.testing.assert_array_equal(lengths, want)
    assert int(out.steps) == want.max() <= 3 < n_new  # the while_loop stopped early


def _stacked_weight_reads_in_loops(model, ids, mask) -> int:
    """How many operations inside the sampler's while loops take a stacked layer parameter [L, ...] as input."""
    from jaxalign.rollout.generate import sampler_call

    graphdef, state = nnx.split(model)
    fn, stops = sampler_call(graphdef, model.config, len(ids), max_new_tokens=6, temperature=0.0,
                             stop_token_ids=())
    closed = fn.trace(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(stops), jax.random.key(0)).jaxpr
    stacked = {tuple(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model.layers))}

    def walk(jaxpr, in_loop):
        count = 0
        for eqn in jaxpr.eqns:
            if in_loop and any(tuple(getattr(v.aval, "shape", ())) in stacked for v in eqn.invars):
                count += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        count += walk(inner, in_loop or eqn.primitive.name == "while")
        return count

    return walk(closed.jaxpr, False)


def test_on_cpu_the_decode_loop_reads_no_stacked_weights(monkeypatch):
    """On CPU the layer weights are sliced out of the stack once, before the decode loop, so no operation inside
    the loop reads a stacked parameter; the accelerator path reads each layer's weights out of the stack at
    every step (the count this test sees when it turns the CPU rule off)."""
    generate_module = importlib.import_module("jaxalign.rollout.generate")  # the package exports the function

    model = Decoder(dataclasses.replace(TINY, num_hidden_layers=3), rngs=nnx.Rngs(1))
    ids, mask = left_padded([3, 5], 16, seed=1)
    assert generate_module.slices_weights_once(None)  # this machine is a CPU
    generate_module._compiled.cache_clear()
    assert _stacked_weight_reads_in_loops(model, ids, mask) == 0
    monkeypatch.setattr(generate_module, "slices_weights_once", lambda mesh: False)
    generate_module._compiled.cache_clear()
    try:
        assert _stacked_weight_reads_in_loops(model, ids, mask) >= 3 * 7  # each layer's 7 weight matrices
    finally:
        generate_module._compiled.cache_clear()


def test_token_choice_equals_argmax_and_categorical():
    """Greedy picks numpy's argmax (the first of tied maxima, -inf entries never); a draw at temperature > 0
    is ``jax.random.categorical``'s for the same key."""
    from jaxalign.rollout.sampling import select_tokens

    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(32, 50)), 1).astype(np.float32)  # rounded: many ties
    logits[:, 40:] = -np.inf
    logits[3] = 2.0  # a row of equal logits
    np.testing.assert_array_equal(np.asarray(select_tokens(jnp.asarray(logits), jax.random.key(0), 0.0)),
                                  np.argmax(logits, -1))
    for seed in range(3):
        key = jax.random.key(seed)
        got = np.asarray(select_tokens(jnp.asarray(logits), key, 1.0))
        np.testing.assert_array_equal(got, np.asarray(jax.random.categorical(key, jnp.asarray(logits), axis=-1)))
        assert (got < 40).all()


def test_decode_row_parts_and_cpu_scheduling_options():
    """On one CPU device the decode splits 16 rows or more (an even number) in 2 parts, and the sampler compiles
    with XLA:CPU's concurrency-optimised scheduling, when this XLA knows the option; elsewhere neither."""
    from jaxalign.rollout.generate import CPU_SCHEDULING, compiler_options, decode_row_parts

    assert jax.devices()[0].platform == "cpu"
    assert [decode_row_parts(None, rows) for rows in (1, 3, 8, 15, 16, 17, 64)] == [1, 1, 1, 1, 2, 1, 2]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    assert decode_row_parts(mesh, 64) == 1  # rows sharded over devices stay whole
    # The enum spelling (jax 0.10 to 0.12 have it; 0.12 ignores the older bool), else the bool.
    enum, flag = (dict(options) for options in CPU_SCHEDULING)
    assert compiler_options("cpu") == (enum if tuple(map(int, jax.__version__.split(".")[:2])) >= (0, 10) else flag)
    assert compiler_options("tpu") is None and compiler_options("gpu") is None
    assert compiler_options("cpu", ((("xla_cpu_no_such_option", True),),)) is None
    assert compiler_options("cpu", ((("xla_cpu_scheduler_type", "NO_SUCH_TYPE"),), tuple(flag.items()))) == flag
