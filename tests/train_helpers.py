"""Tiny model folders, datasets and configs for the training tests (KTO, RM)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxalign.config import resolve
from jaxalign.convert import save_hf_model
from jaxalign.data.tiny_tokenizer import build_char_tokenizer
from jaxalign.models.factory import llama_config, random_model


def make_model_dir(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer Llama folder over the char tokenizer, with the tokenizer saved beside it."""
    tok = build_char_tokenizer()
    cfg = llama_config(len(tok), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    save_hf_model(random_model(cfg, seed=seed), path, tokenizer=tok)
    return Path(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def conv(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def config(model_dir, dataset, out, **over):
    """rlhf options for a fast single-device run (gradient checkpointing off, fixed buckets)."""
    flags = dict(model=str(model_dir), dataset=str(dataset), output_dir=str(out), mesh="data=1,fsdp=1,tensor=1",
                 gradient_checkpointing=False, max_length=48, length_buckets="48", logging_steps=1,
                 save_steps=1000, lr_scheduler_type="constant", weight_decay=0.0)
    flags.update(over)
    return resolve("rlhf", None, flags)


def np_token_logps(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log p(ids[:, t] | ids[:, :t]) from logits [B, T, V] with numpy; column 0 is 0."""
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    out = np.zeros(ids.shape, np.float64)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            out[b, t] = logits[b, t - 1, ids[b, t]] - logz[b, t - 1]
    return out


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def jit_forward(model, method: str = "__call__"):
    """A plain (no loss, no grad) forward of ``model`` compiled once: f(ids, attention_mask) -> numpy."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, attn: getattr(nnx.merge(graphdef, s), method)(ids, attn))
    return lambda ids, attn: np.asarray(fn(state, ids, attn))
