"""One prompt, several completions, one row: the shared-prefix layout of a training forward.

GRPO trains ``num_generations`` completions of each prompt; DPO a chosen and a rejected reply
(:func:`jaxalign.data.collate.collate_pair_shared` lays those out). Laid out one
sequence per completion, every completion carries its own copy of the prompt through every layer. Here a row
holds the prompt once, left-padded to its bucket, followed by the completions, each right-padded to its own
length::

    [ prompt (segment 0) | completion 1 (segment 1) | completion 2 (segment 2) | ... ]

Attention lets each completion see the prompt and itself only (:func:`jaxalign.models.attention.attend`'s
``segments``) and each completion's positions continue from the prompt's, so every completion token gets
exactly the hidden state it gets in its own sequence. The completions' log-probs are read from the positions
that predict them; a completion's first token is predicted by the prompt's last position, shared by all.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxalign.trainers.logprobs import HeadStats, head_stats


def pack_factor(group: int, rows_per_device: int) -> int:
    """Completions per packed row: the most that keeps each row within one prompt's group of ``group``
    consecutive rows and each device's ``rows_per_device`` rows a whole number of packed rows."""
    return math.gcd(int(group), int(rows_per_device))


def pack_rows(prompt_ids: np.ndarray, prompt_mask: np.ndarray, completion_ids: np.ndarray,
              completion_mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-completion rows (prompt [N, P] repeated within each group, completion [N, C]) -> packed
    ``(input_ids, attention_mask)`` [N / k, P + k * C]: rows r*k .. r*k + k - 1 share row r*k's prompt."""
    n, p = prompt_ids.shape
    c = completion_ids.shape[1]
    if n % k:
        raise ValueError(f"{n} rows do not pack {k} to a row")
    first = slice(0, n, k)
    ids = np.concatenate([prompt_ids[first], completion_ids.reshape(n // k, k * c)], axis=1)
    mask = np.concatenate([prompt_mask[first], completion_mask.reshape(n // k, k * c)], axis=1)
    return ids.astype(np.int32), mask.astype(np.int32)


def segments(prompt_len: int, completion_lens: tuple[int, ...]) -> np.ndarray:
    """[P + sum(C_i)] int32: 0 over the prompt, i over completion i (from 1)."""
    return np.concatenate([np.zeros(prompt_len, np.int32)] +
                          [np.full(c, i + 1, np.int32) for i, c in enumerate(completion_lens)])


def predicting_index(prompt_len: int, completion_lens: tuple[int, ...]) -> np.ndarray:
    """[sum(C_i)] int32: the position whose hidden state predicts each completion token (its own previous
    position, the prompt's last for a completion's first token)."""
    out, start = [], prompt_len
    for c in completion_lens:
        out.append(np.concatenate([[prompt_len - 1], start + np.arange(c - 1)]).astype(np.int32))
        start += c
    return np.concatenate(out)


def positions(attention_mask: jnp.ndarray, prompt_len: int, completion_lens: tuple[int, ...]) -> jnp.ndarray:
    """[R, P + sum(C_i)] RoPE positions, each completion's those of its own sequence (prompt + completion):
    the count of real tokens up to a slot, minus one, pad slots keeping the last real one's."""
    mask = attention_mask.astype(jnp.int32)
    prompt_count = jnp.cumsum(mask[:, :prompt_len], axis=1)
    parts, start = [prompt_count], prompt_len
    for c in completion_lens:
        parts.append(prompt_count[:, -1:] + jnp.cumsum(mask[:, start : start + c], axis=1))
        start += c
    return jnp.maximum(jnp.concatenate(parts, axis=1) - 1, 0)


def completion_stats(model, input_ids, attention_mask, completion_lens: tuple[int, ...], *,
                     temperature: float = 1.0, entropy: bool = False, mean_logits: bool = False) -> HeadStats:
    """One forward over packed rows [R, P + sum(C_i)]: each completion token's log-prob (and the entropy and
    vocabulary-mean logit of the position predicting it) at ``temperature``, [R, sum(C_i)] in the row's order.
    Only those positions go through the LM head."""
    total = int(sum(completion_lens))
    prompt_len = input_ids.shape[1] - total
    hidden, _ = model.hidden_states(input_ids, attention_mask, positions(attention_mask, prompt_len, completion_lens),
                                    segments=segments(prompt_len, completion_lens))
    picked = hidden[:, predicting_index(prompt_len, completion_lens)]
    return head_stats(picked, model.logits, input_ids[:, prompt_len:], temperature=temperature, entropy=entropy,
                      mean_logits=mean_logits)
