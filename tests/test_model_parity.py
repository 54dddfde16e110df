"""jaxalign's decoder against Hugging Face transformers (PyTorch, float32) on padded batches.

The reference for every padded row is transformers run on that row alone, unpadded: it needs
no mask or position convention, so it checks our masking and default positions as well.
"""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import SHARP, hf_row_logits, max_diff_real, padded_batch, rewrite_config, FAMILIES, save_hf_model_dir
from jaxalign.convert import load_hf_model

# case -> (family, config overrides). The FAMILIES cover GQA, tied/untied embeddings, Qwen2 qkv bias,
# Qwen3 q/k norm and llama3 rope scaling; the extra cases cover the other ways the families differ.
CASES = {name: (name, {}) for name in FAMILIES}
CASES.update(
    {
        "llama_attention_and_mlp_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),  # o_proj bias too
        "qwen3_attention_bias": ("qwen3", dict(attention_bias=True)),
        "llama_linear_rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
        "mistral_sliding_window": ("mistral", dict(sliding_window=4)),
        # Qwen2 layer 0 full attention, layer 1 sliding (max_window_layers decides per layer).
        "qwen2_mixed_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
        "gemma_attention_bias": ("gemma", dict(attention_bias=True)),  # all four projections
        "gemma2_untied_no_caps": ("gemma2", dict(tie_word_embeddings=False, attn_logit_softcapping=None,
                                                 final_logit_softcapping=None)),
    }
)
LENGTHS, WIDTH = (12, 9, 4), 12  # mixed lengths; 12 > the sliding window of 4
TOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (transformers model, folder, jaxalign float32 model), built once per module."""
    cache = {}

    def get(case):
        if case not in cache:
            family, overrides = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            hf = save_hf_model_dir(family, folder, **SHARP, **overrides)
            cache[case] = (hf, folder, load_hf_model(folder))
        return cache[case]

    return get


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_logits_match_transformers(built, case, side):
    hf, _, model = built(case)
    ids, mask = padded_batch(LENGTHS, WIDTH, side)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    assert logits.shape == (len(LENGTHS), WIDTH, hf.config.vocab_size)
    ref = hf_row_logits(hf, ids, mask)
    assert max_diff_real(logits, ref, mask) <= TOL


def test_llama3_rope_scaling_is_applied(built, tmp_path):
    """The same weights with default RoPE give clearly different logits, so ignoring the scaling fails parity."""
    hf_llama3, folder, model = built("llama3_rope_tied")
    plain = tmp_path / "plain_rope"
    shutil.copytree(folder, plain)
    rewrite_config(plain, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rope_scaling=None)
    hf_plain = transformers.AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()
    model_plain = load_hf_model(plain)
    assert model.config.rope_type == "llama3" and model_plain.config.rope_type == "default"

    ids, mask = padded_batch(LENGTHS, WIDTH, "left")
    ref_llama3 = hf_row_logits(hf_llama3, ids, mask)
    ref_plain = hf_row_logits(hf_plain, ids, mask)
    scaling_effect = max(float(np.abs(a - b).max()) for a, b in zip(ref_llama3, ref_plain))
    assert scaling_effect > 100 * TOL  # the scaling matters at these positions...
    assert max_diff_real(model(ids, mask), ref_llama3, mask) <= TOL  # ...and we apply it
    assert max_diff_real(model_plain(ids, mask), ref_plain, mask) <= TOL
    assert max_diff_real(model_plain(ids, mask), ref_llama3, mask) > 100 * TOL


def test_explicit_positions(built):
    hf, _, model = built("llama3_rope_tied")
    # Right padding: positions 0..T-1 are exactly the default.
    ids, mask = padded_batch(LENGTHS, WIDTH, "right")
    default = np.asarray(model(ids, mask))
    explicit = np.asarray(model(ids, mask, jnp.broadcast_to(jnp.arange(WIDTH), ids.shape)))
    real = mask.astype(bool)
    np.testing.assert_array_equal(explicit[real], default[real])
    # Left padding: the default counts real tokens only (cumsum of the mask - 1).
    ids, mask = padded_batch(LENGTHS, WIDTH, "left")
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    np.testing.assert_array_equal(np.asarray(model(ids, mask, positions)), np.asarray(model(ids, mask)))
    # Positions with a gap (RoPE only sees relative distances, so a constant shift would change
    # nothing) are really used, and match transformers given the same position_ids.
    ids = ids[:1]
    gapped = np.arange(WIDTH)[None] + 20 * (np.arange(WIDTH)[None] >= WIDTH // 2)
    got = np.asarray(model(ids, None, gapped))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), position_ids=torch.tensor(gapped)).logits.numpy()
    assert float(np.abs(got - ref).max()) <= TOL
    assert float(np.abs(got - np.asarray(model(ids))).max()) > 100 * TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_compute_close_to_float32(built, family):
    _, folder, model32 = built(family)
    model16 = load_hf_model(folder, dtype="bfloat16")
    # Master parameters stay float32; only the compute dtype changes.
    assert model16.embed_tokens[...].dtype == jnp.float32
    assert model16.layers.self_attn.q_proj.kernel[...].dtype == jnp.float32
    ids, mask = padded_batch(LENGTHS, WIDTH, "left")
    ref = np.asarray(model32(ids, mask))
    logits = model16(ids, mask)
    assert logits.dtype == jnp.float32
    real = mask.astype(bool)
    diff = (np.asarray(logits) - ref)[real]
    rel_rms = float(np.sqrt(np.mean(diff**2) / np.mean(ref[real] ** 2)))
    rel_max = float(np.abs(diff).max() / np.abs(ref[real]).max())
    # bfloat16 keeps 8 significant bits, so each rounding of an activation costs up to 2^-8
    # relative (RMS ~2^-8/sqrt(3)). A token passes ~10 rounded tensors per layer (norm out, q/k/v,
    # rope, probs, attention out, o_proj, gate/up/down) over 2 layers plus the head, and the sharp
    # softmax of these models amplifies score errors: sqrt(20) * 2^-8 ~ 1.7%. Measured over 15
    # random models (5 families x 3 seeds): relative RMS error 1.1-1.8%, worst single logit 3.5%
    # of the largest logit. We allow 2^-5 (3.1%) RMS and 2^-4 (6.25%) max: ~2x margin, while a
    # real bug (wrong mask, RoPE, weight or softmax in bf16 over large scores) moves logits by
    # tens of percent of their scale.
    assert rel_rms <= 2.0**-5, rel_rms
    assert rel_max <= 2.0**-4, rel_max
    # ...and bfloat16 really was used (float32 compute would agree to ~1e-6).
    assert rel_rms > 1e-4
