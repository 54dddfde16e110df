"""Held-out evaluation by generation: greedy exact match on rows with a ``solution`` column."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jaxalign.data.collate import left_pad
from jaxalign.data.tokenizer import pad_id_of
from jaxalign.demo.synthetic import exact_match
from jaxalign.rollout import generate


def render_prompts(tokenizer, rows: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Token ids of each row's prompt (messages without the final assistant turn) + generation prompt."""
    out = []
    for row in rows:
        msgs = [m for m in row["messages"]]
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def sampled_completions(
    model, tokenizer, rows, *, max_new_tokens: int, temperature: float = 0.0, samples: int = 1, seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """``samples`` completions per row (row-major; decoded, special tokens dropped) in fixed-shape batches:
    one compilation. ``temperature`` 0 is greedy."""

    prompts = [p for p in render_prompts(tokenizer, rows) for _ in range(samples)]
    length = max(len(p) for p in prompts)
    pad = pad_id_of(tokenizer)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # same shape for every batch
        ids, mask = left_pad(chunk, length, pad)
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, pad_token_id=pad,
                       rng=jax.random.fold_in(jax.random.PRNGKey(seed), start))
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for i in range(n):
            texts.append(tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True))
    return texts


def greedy_completions(model, tokenizer, rows, *, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """One greedy completion per row."""
    return sampled_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)


def exact_match_accuracy(model, tokenizer, rows, *, max_new_tokens: int, batch_size: int = 64) -> tuple[float, list[str]]:
    """Fraction of rows whose greedy completion equals the row's ``solution``; and the completions."""

    texts = greedy_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = [exact_match(t, r["solution"]) for t, r in zip(texts, rows)]
    return float(np.mean(hits)) if hits else 0.0, texts


def sampled_exact_match(
    model, tokenizer, rows, *, max_new_tokens: int, samples: int, temperature: float, seed: int = 0
) -> float:
    """Mean exact match of ``samples`` sampled completions per row: the expected exact-match reward."""

    texts = sampled_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                                samples=samples, seed=seed)
    hits = [exact_match(t, rows[i // samples]["solution"]) for i, t in enumerate(texts)]
    return float(np.mean(hits)) if hits else 0.0
