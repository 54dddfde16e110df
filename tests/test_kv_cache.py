"""KV cache self-consistency: prefill + single-token decode steps equal one full forward (float32).

Calls are compiled, as the sampler runs them (cache index traced); one compilation per shape is
also far cheaper than eager op-by-op dispatch of new shapes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SHARP, cached_forward, forward, padded_batch, save_hf_model_dir
from jaxalign.convert import load_hf_model
from jaxalign.models import init_cache
from jaxalign.models.kv_cache import first_blocks, layer_slots, put_blocks, unstack

CASES = {
    "llama": ("llama", {}),  # GQA, untied
    "llama3_rope_tied": ("llama3_rope_tied", {}),
    "qwen2": ("qwen2", {}),  # qkv bias
    "qwen3": ("qwen3", {}),  # q/k norm
    "mistral_sliding_window": ("mistral", dict(sliding_window=4)),  # decoding runs past the window
}
PROMPT_LENGTHS, PROMPT_WIDTH = (7, 4, 2), 7  # left-padded prompts of mixed lengths
STEPS = 5
MAX_LEN = 16  # more slots than used: the empty ones must stay masked
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            family, overrides = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            save_hf_model_dir(family, folder, **SHARP, **overrides)
            cache[case] = load_hf_model(folder)
        return cache[case]

    return get


def data(vocab):
    """Left-padded prompts, STEPS tokens to decode, and the full sequence's mask."""
    prompt, prompt_mask = padded_batch(PROMPT_LENGTHS, PROMPT_WIDTH, "left", vocab=vocab)
    new_tokens = np.random.RandomState(1).randint(3, vocab, size=(len(PROMPT_LENGTHS), STEPS)).astype(np.int32)
    return prompt, prompt_mask, new_tokens


def full_forward(model, prompt, prompt_mask, new_tokens):
    """Logits of one forward over prompt + new tokens: the reference."""
    ids = np.concatenate([prompt, new_tokens], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(new_tokens)], axis=1)
    return np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def check_prefill(logits, full, prompt_mask):
    real = prompt_mask.astype(bool)
    assert float(np.abs(np.asarray(logits)[real] - full[:, : prompt_mask.shape[1]][real]).max()) <= TOL


def decode(step, model, cache, new_tokens, full):
    """Feed new tokens one at a time; each step's logits equal the full forward's at that slot."""
    first = int(cache.index)
    for i in range(new_tokens.shape[1]):
        tokens = jnp.asarray(new_tokens[:, i : i + 1])
        logits, cache = step(model, tokens, jnp.ones_like(tokens), cache)
        assert logits.shape == (len(PROMPT_LENGTHS), 1, model.config.vocab_size)
        assert float(np.abs(np.asarray(logits[:, 0]) - full[:, first + i]).max()) <= TOL, f"decode step {i}"
    return cache


@pytest.mark.parametrize("case", ["llama", "qwen3", "mistral_sliding_window"])
def test_decode_over_per_layer_cache_equals_full_forward(models, case):
    """The sampler's decode form: the stacked cache after prefill split into per-layer arrays, the layers
    unrolled; every step equals the full forward, and the stacked and per-layer caches hold the same slots."""
    model = models(case)
    prompt, prompt_mask, new_tokens = data(model.config.vocab_size)
    full = full_forward(model, prompt, prompt_mask, new_tokens)
    cache = init_cache(model.config, len(PROMPT_LENGTHS), MAX_LEN)
    _, cache = cached_forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache)
    per_layer = decode(cached_forward, model, unstack(cache), new_tokens, full)
    stacked = decode(cached_forward, model, cache, new_tokens, full)
    assert isinstance(per_layer.keys, tuple) and len(per_layer.keys) == model.config.num_hidden_layers
    for i, (k, v) in enumerate(zip(per_layer.keys, per_layer.values)):
        np.testing.assert_allclose(np.asarray(layer_slots(k)), np.asarray(stacked.keys[i]), atol=TOL)
        np.testing.assert_allclose(np.asarray(layer_slots(v)), np.asarray(stacked.values[i]), atol=TOL)


@pytest.mark.parametrize("row_parts", [1, 3])
@pytest.mark.parametrize("case", ["llama", "mistral_sliding_window"])
def test_decode_in_phases_over_blocks_equals_full_forward(models, case, row_parts):
    """The sampler's phases: prefill a cache of the prompt's slots only, add two empty blocks (2 and 3 slots),
    decode 2 steps attending to the prompt and the first block, then 3 over all three blocks; every step equals
    the full forward, and the blocks joined hold what a stacked cache of every slot holds. With ``row_parts`` 3
    each block is 3 arrays of one row."""
    model = models(case)
    prompt, prompt_mask, new_tokens = data(model.config.vocab_size)
    full = full_forward(model, prompt, prompt_mask, new_tokens)
    cache = init_cache(model.config, len(PROMPT_LENGTHS), PROMPT_WIDTH)
    _, cache = cached_forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache)
    blocks = unstack(cache, blocks=(2, 3), row_parts=row_parts)
    assert all(isinstance(block, tuple) == (row_parts > 1) for block in blocks.keys[0])
    assert blocks.max_len == PROMPT_WIDTH + STEPS and blocks.read_slots == PROMPT_WIDTH + STEPS
    phase1 = first_blocks(blocks, 2)
    assert phase1.read_slots == PROMPT_WIDTH + 2
    phase1 = decode(cached_forward, model, phase1, new_tokens[:, :2], full)
    phase2 = decode(cached_forward, model, put_blocks(blocks, phase1), new_tokens[:, 2:], full)
    stacked = init_cache(model.config, len(PROMPT_LENGTHS), PROMPT_WIDTH + STEPS)
    _, stacked = cached_forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), stacked)
    stacked = decode(cached_forward, model, stacked, new_tokens, full)
    np.testing.assert_array_equal(np.asarray(phase2.mask), np.asarray(stacked.mask))
    real = np.asarray(stacked.mask).astype(bool)  # padding slots hold whatever a masked query row computed
    for i in range(model.config.num_hidden_layers):
        for ours, want in ((phase2.keys[i], stacked.keys[i]), (phase2.values[i], stacked.values[i])):
            ours, want = np.moveaxis(np.asarray(layer_slots(ours)), 2, 1), np.moveaxis(np.asarray(want), 2, 1)
            np.testing.assert_allclose(ours[real], want[real], atol=TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_equals_full_forward(models, case):
    model = models(case)
    prompt, prompt_mask, new_tokens = data(model.config.vocab_size)
    full = full_forward(model, prompt, prompt_mask, new_tokens)

    cache = init_cache(model.config, len(PROMPT_LENGTHS), MAX_LEN)
    logits, cache = cached_forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache)
    assert logits.dtype == jnp.float32
    check_prefill(logits, full, prompt_mask)
    assert int(cache.index) == PROMPT_WIDTH
    np.testing.assert_array_equal(np.asarray(cache.lengths), PROMPT_LENGTHS)

    cache = decode(cached_forward, model, cache, new_tokens, full)
    assert int(cache.index) == PROMPT_WIDTH + STEPS
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(PROMPT_LENGTHS) + STEPS)


@pytest.mark.parametrize("case", ["llama", "mistral_sliding_window"])
def test_prefill_in_two_chunks(models, case):
    model = models(case)
    prompt, prompt_mask, new_tokens = data(model.config.vocab_size)
    full = full_forward(model, prompt, prompt_mask, new_tokens)
    cut = 3  # the shortest prompt (2 tokens) is all padding in the first chunk
    assert prompt_mask[:, :cut].sum(axis=1).min() == 0

    cache = init_cache(model.config, len(PROMPT_LENGTHS), MAX_LEN)
    logits1, cache = cached_forward(model, jnp.asarray(prompt[:, :cut]), jnp.asarray(prompt_mask[:, :cut]), cache)
    logits2, cache = cached_forward(model, jnp.asarray(prompt[:, cut:]), jnp.asarray(prompt_mask[:, cut:]), cache)
    check_prefill(np.concatenate([np.asarray(logits1), np.asarray(logits2)], axis=1), full, prompt_mask)
    np.testing.assert_array_equal(np.asarray(cache.lengths), PROMPT_LENGTHS)
    # Decode steps may leave the mask out (every new token is real).
    decode(lambda m, tokens, _mask, c: cached_forward(m, tokens, None, c), model, cache, new_tokens[:, :2], full)
