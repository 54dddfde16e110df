"""Shared helpers for the foundation tests (model parity, KV cache, conversion, sharding, export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from flax import nnx

# transformers' default initializer_range (0.02) makes attention scores ~0 in tiny random models, so
# attention is nearly uniform and RoPE barely moves the logits (~1e-4): a parity test at 1e-4 could
# then miss a RoPE or masking bug. With 0.2 the attention is sharp (RoPE scaling moves logits by ~0.7).
SHARP = dict(initializer_range=0.2)

# Dimensions divisible by 8 so every sharded dimension really splits on 8 simulated devices.
SHARDABLE = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128)


def padded_batch(lengths, width: int, side: str, *, vocab: int = 97, seed: int = 0):
    """(ids [B, width] int32, mask [B, width] int32) with real tokens of the given lengths.

    Padding slots hold random junk ids (not the pad id), so only the mask can hide them.
    """
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(len(lengths), width)).astype(np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n :] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def hf_row_logits(hf_model, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Hugging Face logits of each row's real tokens, run alone without any padding (the reference)."""
    out = []
    with torch.no_grad():
        for row, m in zip(ids, mask):
            real = torch.tensor(row[m.astype(bool)], dtype=torch.long)[None]
            out.append(hf_model(input_ids=real).logits[0].numpy())
    return out


def max_diff_real(logits: np.ndarray, ref_rows: list[np.ndarray], mask: np.ndarray) -> float:
    """Largest |logits - reference| over the real (unpadded) positions of every row."""
    worst = 0.0
    for row_logits, ref, m in zip(np.asarray(logits), ref_rows, mask):
        got = row_logits[m.astype(bool)]
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def tiny_tokenizer():
    """A word-level fast tokenizer with a chat template, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "the", "cat", "sat", "user", "assistant"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}",
    )


def rewrite_config(folder: Path, **changes) -> None:
    """Edit keys of a model folder's config.json in place."""
    cfg_file = Path(folder) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


def assert_state_dicts_identical(a: dict, b: dict) -> None:
    """Same tensor names and torch.equal (bit-identical) values."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@nnx.jit
def jit_forward(model, ids, mask=None, positions=None):
    """model(ids, mask, positions) compiled once per model and shape: much faster than eager dispatch."""
    return model(ids, mask, positions)


@nnx.jit
def jit_cached(model, ids, mask, cache):
    """model(ids, mask, cache=cache) compiled once per model and shape, as the sampler runs it."""
    return model(ids, mask, cache=cache)
