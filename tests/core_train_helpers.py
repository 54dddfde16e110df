"""Shared helpers for the training-core tests (SFT step, run, resume, sharding, CLI errors):
a tiny base model folder, data files, options and float64 references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxalign.data import build_char_tokenizer, make_addition_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Tiny Llama: every dimension divides an fsdp=4 x tensor=2 mesh (vocab 80 > the tokenizer's 69 ids).
MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=128)
VOCAB = 80

# Options every test run shares: short sequences in two buckets, one device, no remat, logs every step.
TINY = dict(
    max_length=64, length_buckets="32,64", gradient_checkpointing=False, mesh="data=1,fsdp=1,tensor=1",
    learning_rate=1e-3, lr_scheduler_type="cosine", warmup_ratio=0.0, weight_decay=0.0,
    per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, save_steps=1000, seed=0,
)


def make_base(path, seed: int = 0) -> str:
    """A tiny random-weight Llama Hugging Face folder with the char tokenizer; returns its path."""
    from jaxalign.convert import save_hf_model
    from jaxalign.models.factory import llama_config, random_model

    tok = build_char_tokenizer()
    cfg = llama_config(VOCAB, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **MODEL)
    save_hf_model(random_model(cfg, seed=seed), path, tokenizer=tok)
    return str(path)


def short_rows(n: int, seed: int = 0) -> list[dict]:
    """Addition rows of 26-30 tokens (bucket 32)."""
    return make_addition_rows(n, seed=seed, digits=(1, 2))


def long_rows(n: int, seed: int = 0) -> list[dict]:
    """Addition rows with a system turn, 39-46 tokens (bucket 64)."""
    return make_addition_rows(n, seed=seed, digits=(1, 3), system="add")


def write_jsonl(path, rows) -> str:
    """Rows (dicts, or raw strings written as they are) one per line."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sft_config(**flags):
    """A resolved SFT config: TINY, then ``flags``."""
    from jaxalign.config import resolve

    return resolve("sft", None, {**TINY, **flags})


def cli_args(options: dict) -> list[str]:
    """{"max_steps": 3} -> ["--max_steps", "3"]."""
    out = []
    for k, v in options.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def hf_logits(folder, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] from transformers on a Hugging Face folder (float32, right-padded rows)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids, np.int64)),
                    attention_mask=torch.as_tensor(np.asarray(attention_mask, np.int64)))
    return out.logits.numpy()


def reference_nll(logits: np.ndarray, input_ids: np.ndarray, loss_mask: np.ndarray) -> tuple[float, float]:
    """(token-mean NLL, token accuracy) over the response tokens, by a float64 log-softmax.

    Position t-1 predicts token t; ``loss_mask[:, t]`` marks token t as a response token.
    """
    lg = np.asarray(logits, np.float64)[:, :-1]
    targets = np.asarray(input_ids)[:, 1:]
    mask = np.asarray(loss_mask, np.float64)[:, 1:]
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    tokens = mask.sum()
    acc = ((lg.argmax(-1) == targets) * mask).sum() / tokens
    return float(-(picked * mask).sum() / tokens), float(acc)


def one_error_line(err: str) -> str:
    """The single line the CLI wrote to stderr (asserting there is exactly one)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("jaxalign: error: "), lines[0]
    return lines[0]
