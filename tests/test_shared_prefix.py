"""The shared-prefix layout (issue 19): a row holding a prompt once and several completions of it gives every
completion token the log-prob (and gradient) it gets in a sequence of its own.

The references are the plain layout, one left-padded prompt + right-padded completion per row, run through the
same model, and, for attention alone, each completion's own sequence attended to separately in float64 numpy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.demo.tiny_model import llama_config, random_model
import jaxalign.models.attention as attention
from jaxalign.models.attention import attend, segment_slots
from jaxalign.models.decoder import set_attn_impl
from jaxalign.trainers import logprobs, shared_prefix

VOCAB = 53


# ----- the layout, by hand ---------------------------------------------------------------------------------
def test_segment_slots_count_from_the_prompts_end():
    seg = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    assert segment_slots(seg).tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert segment_slots(np.zeros(4, int)).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="must come before"):
        segment_slots(np.array([0, 1, 0, 2]))


def test_pack_factor_keeps_rows_within_a_group_and_a_device():
    assert shared_prefix.pack_factor(8, 64) == 8  # the bench: a prompt's 8 completions to a row
    assert shared_prefix.pack_factor(8, 4) == 4  # half a group per device: 4 to a row
    assert shared_prefix.pack_factor(4, 6) == 2
    assert shared_prefix.pack_factor(8, 1) == 1  # nothing to share


def test_pack_rows_and_prediction_index_by_hand():
    prompt = np.array([[0, 7, 8]] * 2 + [[5, 6, 9]] * 2)
    pmask = np.array([[0, 1, 1]] * 2 + [[1, 1, 1]] * 2)
    comp = np.array([[1, 2], [3, 0], [4, 5], [6, 7]])
    cmask = np.array([[1, 1], [1, 0], [1, 1], [1, 1]])
    ids, mask = shared_prefix.pack_rows(prompt, pmask, comp, cmask, 2)
    assert ids.tolist() == [[0, 7, 8, 1, 2, 3, 0], [5, 6, 9, 4, 5, 6, 7]]
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    # completion 1's first token is predicted by the prompt's last slot (2), its second by its first (3);
    # completion 2's first again by slot 2, its second by its own first (5)
    assert shared_prefix.predicting_index(3, (2, 2)).tolist() == [2, 3, 2, 5]
    assert shared_prefix.segments(3, (2, 2)).tolist() == [0, 0, 0, 1, 1, 2, 2]
    # positions: each completion continues from its prompt's real length (2 and 3); a pad keeps the last one's
    pos = shared_prefix.positions(jnp.asarray(mask), 3, (2, 2))
    assert np.asarray(pos).tolist() == [[0, 0, 1, 2, 3, 2, 2], [0, 1, 2, 3, 4, 3, 4]]


def test_pair_shared_prompt_length_and_layout_by_hand():
    from jaxalign.data.batching import stack_micro_batches
    from jaxalign.data.collate import collate_pair_shared
    from jaxalign.data.encode import PairExample

    def pair(c, cm, r, rm):
        return PairExample(np.array(c), np.array(cm), np.array(r), np.array(rm))

    a = pair([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], [1, 2, 3, 9], [0, 0, 0, 1])
    assert a.shared_prompt_length == 3
    assert pair([1, 2, 3, 4], [0, 0, 1, 1], [1, 2, 3, 9], [0, 0, 0, 1]).shared_prompt_length == 2  # first loss token
    assert pair([1, 7, 3, 4], [0, 0, 0, 1], [1, 2, 3, 9], [0, 0, 0, 1]).shared_prompt_length == 1  # they part at 1
    assert pair([5, 2], [0, 1], [1, 2], [0, 1]).shared_prompt_length == 0
    b = pair([6, 7, 8], [0, 1, 1], [6, 9], [0, 1])
    out = collate_pair_shared([a, b], 4, 2, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 9, 0], [0, 0, 0, 6, 7, 8, 9, 0]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 0]]
    assert out["chosen_loss_mask"].tolist() == [[1, 1], [1, 1]] and out["rejected_loss_mask"].tolist() == [[1, 0],
                                                                                                           [1, 0]]
    with pytest.raises(ValueError, match="wider"):
        collate_pair_shared([a], 4, 1, pad_id=0)
    # micro-batches of one step with different widths: prompts widened on the left, replies on the right
    narrow = collate_pair_shared([b], 1, 2, pad_id=0)
    stacked = stack_micro_batches([narrow, collate_pair_shared([a], 4, 3, pad_id=0)], pad_id=0)
    assert stacked["input_ids"][0].tolist() == [[0, 0, 0, 6, 7, 8, 0, 9, 0, 0]]
    assert stacked["chosen_loss_mask"][0].tolist() == [[1, 1, 0]]
    assert stacked["input_ids"][1].tolist() == [[0, 1, 2, 3, 4, 5, 0, 9, 0, 0]]


def test_batch_iterator_shares_prompts_only_where_every_row_has_one():
    from jaxalign.data.batching import BatchIterator
    from jaxalign.data.encode import PairExample

    prompt, loss = np.arange(1, 7), np.array([0] * 6 + [1, 1])
    rows = [PairExample(np.r_[prompt, 7, 8], loss, np.r_[prompt, 9], loss[:7])] * 2
    batch = next(BatchIterator(rows, 2, [2, 8], seed=0, shared_prefix=True))
    assert batch["input_ids"].shape == (2, 8 + 2 * 2)  # prompt 6 -> bucket 8, replies of 2 -> 2; plain: 2 x 8
    assert "input_ids" not in next(BatchIterator(rows, 2, [2, 8], seed=0))  # shared_prefix off: a sequence each
    # no gain with a coarse ladder (prompt and replies in 8-slot buckets: 24 > 2 x 8): plain rows
    assert "input_ids" not in next(BatchIterator(rows, 2, [8], seed=0, shared_prefix=True))
    odd = [PairExample(np.r_[9, prompt[1:], 7, 8], loss, np.r_[prompt, 9], loss[:7])]  # differs at the first token
    assert "chosen_input_ids" in next(BatchIterator(rows[:1] + odd, 2, [2, 8], seed=0, shared_prefix=True))


# ----- attention -------------------------------------------------------------------------------------------
def np_attention(q, k, v, allowed):
    """float64 softmax attention of q [T, N, D] over k, v [S, K, D] (GQA) where ``allowed`` [T, S]."""
    n, kv = q.shape[1], k.shape[1]
    k, v = np.repeat(k, n // kv, axis=1), np.repeat(v, n // kv, axis=1)
    s = np.einsum("tnd,snd->nts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nts,snd->tnd", p, v)


@pytest.mark.parametrize("impl", ["xla", "chunked", "chunked-tiles"])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_sees_the_prompt_and_its_own_completion(impl, window, monkeypatch):
    """Each completion token's output equals attention over its own sequence (the prompt's real keys, then the
    completion's up to itself, within the window), worked out separately per completion in float64."""
    rng = np.random.default_rng(0)
    p_len, lens, n, kv, d = 5, (4, 3, 4), 4, 2, 8
    t = p_len + sum(lens)
    seg = shared_prefix.segments(p_len, lens)
    q = rng.normal(size=(2, t, n, d)).astype(np.float32)
    k = rng.normal(size=(2, kv, t, d)).astype(np.float32)
    v = rng.normal(size=(2, kv, t, d)).astype(np.float32)
    valid = np.ones((2, t), np.int32)
    valid[1, :2] = 0  # row 1's prompt is left-padded by 2
    valid[0, p_len + 4 + 2] = 0  # row 0's second completion ends after 2 tokens
    slots = jnp.asarray(segment_slots(seg))
    if impl == "chunked-tiles":  # several tiles per segment, some of them skipped
        monkeypatch.setattr(attention, "BLOCK_Q", 3)
        monkeypatch.setattr(attention, "BLOCK_K", 2)
    out = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid), slots, slots,
                            sliding_window=window, segments=seg, impl=impl.split("-")[0]))
    starts = np.cumsum((p_len,) + lens)[:-1]
    for b in range(2):
        for i, (start, c) in enumerate(zip(starts, lens)):
            own = np.concatenate([np.arange(p_len), start + np.arange(c)])  # this completion's sequence
            real = own[valid[b, own] > 0]
            for j in range(c):
                if not valid[b, start + j]:
                    continue
                here = int(np.flatnonzero(real == start + j)[0])
                keys = real[: here + 1] if window is None else real[max(0, here + 1 - window) : here + 1]
                allowed = np.isin(np.arange(t), keys)[None]
                want = np_attention(q[b, start + j][None].astype(np.float64), np.swapaxes(k[b], 0, 1),
                                    np.swapaxes(v[b], 0, 1), allowed)[0]
                np.testing.assert_allclose(out[b, start + j], want, rtol=1e-5, atol=1e-5, err_msg=(b, i, j))


def test_chunked_gradient_equals_xla_with_segments(monkeypatch):
    rng = np.random.default_rng(1)
    p_len, lens = 4, (3, 5)
    t = p_len + sum(lens)
    seg = shared_prefix.segments(p_len, lens)
    slots = jnp.asarray(segment_slots(seg))
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 2, t, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 2, t, 8)), jnp.float32)
    valid = jnp.ones((2, t), jnp.int32).at[0, 0].set(0)
    # a query with no key to see (row 0's pad) has an output nothing reads, which differs by implementation
    w = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32) * valid[:, :, None, None]

    def loss(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    want = loss(lambda q, k, v: attend(q, k, v, valid, slots, slots, impl="xla", segments=seg))
    monkeypatch.setattr(attention, "BLOCK_Q", 3)
    monkeypatch.setattr(attention, "BLOCK_K", 4)
    got = loss(lambda q, k, v: attend(q, k, v, valid, slots, slots, impl="chunked", segments=seg))
    for g, x in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(x), rtol=1e-4, atol=1e-5)


def test_a_row_costs_its_segments_not_its_length_squared():
    """The compiled attention of a prompt of 8 and 4 completions of 16 holds scores of at most 8 + 16 keys per
    query (the separate sequences' work), never the row's 72 x 72."""
    p_len, lens = 8, (16,) * 4
    t = p_len + sum(lens)
    seg = shared_prefix.segments(p_len, lens)
    slots = jnp.asarray(segment_slots(seg))
    x = jnp.zeros((1, t, 2, 8), jnp.float32)
    kv = jnp.zeros((1, 1, t, 8), jnp.float32)
    hlo = jax.jit(lambda q, k, v: attend(q, k, v, jnp.ones((1, t), jnp.int32), slots, slots, impl="xla",
                                         segments=seg)).lower(x, kv, kv).as_text()
    assert "16x24xf32" in hlo and "8x8xf32" in hlo  # a completion's scores; the prompt's
    assert f"{t}x{t}xf32" not in hlo


def test_segments_must_be_a_prefix_then_contiguous_runs():
    with pytest.raises(ValueError, match="not contiguous"):
        segment_slots(np.array([0, 1, 2, 1]))


# ----- the model: packed rows against a sequence per completion --------------------------------------------
def plain_and_packed(k: int, p_len: int, c: int, seed: int):
    """A generation of 2 prompts x k completions: (plain ids, plain mask, packed ids, packed mask, completion
    mask), prompts left-padded, completions right-padded (one of them empty but for EOS-like padding)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, VOCAB, (2, p_len))
    pmask = np.ones((2, p_len), np.int32)
    pmask[0, :2] = 0
    prompt, prompt_mask = np.repeat(prompts, k, 0), np.repeat(pmask, k, 0)
    comp = rng.integers(1, VOCAB, (2 * k, c))
    cmask = np.ones((2 * k, c), np.int32)
    cmask[1, 3:] = 0
    cmask[2 * k - 1, 1:] = 0
    plain_ids = np.concatenate([prompt, comp], 1).astype(np.int32)
    plain_mask = np.concatenate([prompt_mask, cmask], 1)
    ids, mask = shared_prefix.pack_rows(prompt, prompt_mask, comp, cmask, k)
    return plain_ids, plain_mask, ids, mask, cmask


def sliding_config():
    """A Llama whose first layer slides over 3 tokens: shorter than the distance from the prompt to any
    completion but the first in a packed row, so a window counted on the row's slots would show."""
    cfg = llama_config(VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return dataclasses.replace(cfg, sliding_window=3, layer_types=("sliding_attention", "full_attention"))


@pytest.mark.parametrize("kind", ["llama", "sliding", "chunked"])
def test_packed_log_probs_and_gradients_equal_a_sequence_per_completion(kind):
    cfg = sliding_config() if kind == "sliding" else llama_config(
        VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = random_model(cfg, seed=3)
    if kind == "chunked":
        set_attn_impl(model, "chunked")
    k, p_len, c, temp = 4, 6, 5, 0.8
    plain_ids, plain_mask, ids, mask, cmask = plain_and_packed(k, p_len, c, seed=4)
    graphdef, params = nnx.split(model)

    def plain(params):
        m = nnx.merge(graphdef, params)
        return logprobs.completion_logps(m, jnp.asarray(plain_ids), jnp.asarray(plain_mask), p_len, temp)

    def packed(params):
        m = nnx.merge(graphdef, params)
        out = shared_prefix.completion_stats(m, jnp.asarray(ids), jnp.asarray(mask), (c,) * k, temperature=temp,
                                             entropy=True)
        return out.logps.reshape(2 * k, c), out.entropy.reshape(2 * k, c)

    (lp, ent), (lp2, ent2) = plain(params), packed(params)
    np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp), atol=2e-6)  # every position, pads included
    np.testing.assert_allclose(np.asarray(ent2), np.asarray(ent), atol=2e-6)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=(2 * k, c)) * cmask, jnp.float32)
    g1 = jax.grad(lambda p: jnp.sum(plain(p)[0] * weights))(params)
    g2 = jax.grad(lambda p: jnp.sum(packed(p)[0] * weights))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_a_window_on_the_rows_slots_would_differ():
    """The sliding test above can fail: counting the window on the packed row's own slots changes the log-probs
    of every completion after the first."""
    model = random_model(sliding_config(), seed=3)
    k, p_len, c = 4, 6, 5
    _, _, ids, mask, _ = plain_and_packed(k, p_len, c, seed=4)
    seg = shared_prefix.segments(p_len, (c,) * k)
    pos = shared_prefix.positions(jnp.asarray(mask), p_len, (c,) * k)
    right, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), pos, segments=seg)
    import jaxalign.models.decoder as decoder

    real = decoder.segment_slots
    try:
        decoder.segment_slots = lambda s: np.arange(len(s), dtype=np.int32)
        wrong, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), pos, segments=seg)
    finally:
        decoder.segment_slots = real
    first = slice(p_len, p_len + c)
    np.testing.assert_allclose(np.asarray(wrong[:, first]), np.asarray(right[:, first]), atol=1e-6)
    assert np.abs(np.asarray(wrong[:, p_len + c :]) - np.asarray(right[:, p_len + c :])).max() > 1e-3
