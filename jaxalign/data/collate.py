"""Pad encoded examples into fixed-shape numpy batches (the trainers' array conventions).

- SFT: ``input_ids`` int32 [B,L], ``attention_mask`` int32 [B,L], ``loss_mask`` float32
  [B,L]; right padded. ``loss_mask[b,t]`` = 1 when token t is trained (predicted from the
  logits at t-1), so ``loss_mask[:,0]`` is 0.
- Pair: ``chosen_*`` and ``rejected_*`` versions of the three, one shared L, plus ``margin``
  float32 [B].
- KTO: the SFT three, ``label`` bool [B], and ``kl_input_ids``/``kl_attention_mask``/
  ``kl_loss_mask``: prompt i with completion (i-1) mod B, as TRL's KTOTrainer pairs them.
- Prompt: ``prompt_input_ids`` int32 [B,P] and ``prompt_attention_mask`` int32 [B,P], left
  padded, plus ``extras`` (a list of per-row dicts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign.data.encode import EncodedExample, KTOExample, PairExample, PromptExample, SFTExample


def kl_rotation(n: int) -> list[int]:
    """Completion index paired with prompt i in the KTO KL batch: ``(i - 1) % n``.

    TRL's KTOTrainer rotates the completions of a batch by one, ``[y_n, y_1, ..., y_{n-1}]``, so
    prompt i meets completion i-1; the same pairing gives the same KL reference point."""
    return [(i - 1) % n for i in range(n)]


def required_length(examples: Sequence[EncodedExample], max_length: int | None = None) -> int:
    """The longest sequence a batch of ``examples`` holds (KTO counts its KL pairs too)."""
    lengths = [ex.length for ex in examples]
    if examples and isinstance(examples[0], KTOExample):
        for ex, j in zip(examples, kl_rotation(len(examples))):
            kl = ex.prompt_ids.shape[0] + examples[j].completion_ids.shape[0]  # type: ignore[union-attr]
            lengths.append(kl if max_length is None else min(kl, max_length))
    return max(lengths) if lengths else 0


def collate(examples: Sequence[EncodedExample], length: int, pad_id: int) -> dict[str, Any]:
    """One batch of ``examples`` padded to ``length`` (dispatches on the example type)."""
    first = examples[0]
    if isinstance(first, SFTExample):
        return collate_sft(examples, length, pad_id)  # type: ignore[arg-type]
    if isinstance(first, PairExample):
        return collate_pair(examples, length, pad_id)  # type: ignore[arg-type]
    if isinstance(first, KTOExample):
        return collate_kto(examples, length, pad_id)  # type: ignore[arg-type]
    if isinstance(first, PromptExample):
        return collate_prompt(examples, length, pad_id)  # type: ignore[arg-type]
    raise TypeError(f"cannot batch {type(first).__name__}")


def _pad_right(seqs: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    b = len(seqs)
    ids = np.full((b, length), pad_id, dtype=np.int32)
    attn = np.zeros((b, length), dtype=np.int32)
    loss = np.zeros((b, length), dtype=np.float32)
    for i, (seq, mask) in enumerate(seqs):
        n = min(seq.shape[0], length)
        ids[i, :n] = seq[:n]
        attn[i, :n] = 1
        loss[i, :n] = mask[:n]
    loss[:, 0] = 0.0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def collate_sft(examples: Sequence[SFTExample], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """SFT batch, right padded to ``length``."""
    return _pad_right([(ex.input_ids, ex.loss_mask) for ex in examples], length, pad_id)


def collate_pair(examples: Sequence[PairExample], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Preference batch: chosen and rejected padded to one shared ``length``, plus margins."""
    chosen = _pad_right([(ex.chosen_ids, ex.chosen_mask) for ex in examples], length, pad_id)
    rejected = _pad_right([(ex.rejected_ids, ex.rejected_mask) for ex in examples], length, pad_id)
    out = {f"chosen_{k}": v for k, v in chosen.items()}
    out.update({f"rejected_{k}": v for k, v in rejected.items()})
    out["margin"] = np.asarray([ex.margin for ex in examples], dtype=np.float32)
    if examples[0].ref_chosen_logps is not None:
        out["ref_chosen_logps"] = np.asarray([ex.ref_chosen_logps for ex in examples], dtype=np.float32)
        out["ref_rejected_logps"] = np.asarray([ex.ref_rejected_logps for ex in examples], dtype=np.float32)
    return out


def collate_pair_shared(examples: Sequence[PairExample], prompt_width: int, reply_width: int,
                        pad_id: int) -> dict[str, np.ndarray]:
    """Preference batch in the shared-prefix layout: each row holds its prompt once, left-padded to
    ``prompt_width``, then the chosen and the rejected reply, each right-padded to ``reply_width``
    (``input_ids``, ``attention_mask`` [B, P + 2R]); ``chosen_loss_mask``, ``rejected_loss_mask`` [B, R]
    cover the replies' slots. The prompt is each row's :attr:`PairExample.shared_prompt_length` tokens (at
    least 1, so every reply token has a position that predicts it)."""
    b = len(examples)
    width = prompt_width + 2 * reply_width
    ids = np.full((b, width), pad_id, np.int32)
    attn = np.zeros((b, width), np.int32)
    loss = {side: np.zeros((b, reply_width), np.float32) for side in ("chosen", "rejected")}
    for i, ex in enumerate(examples):
        p = ex.shared_prompt_length
        if p < 1 or p > prompt_width:
            raise ValueError(f"row {i}: shared prompt of {p} tokens does not fit 1..{prompt_width}")
        ids[i, prompt_width - p : prompt_width] = ex.chosen_ids[:p]
        attn[i, prompt_width - p : prompt_width] = 1
        for j, (side, seq, mask) in enumerate((("chosen", ex.chosen_ids, ex.chosen_mask),
                                               ("rejected", ex.rejected_ids, ex.rejected_mask))):
            n = seq.shape[0] - p
            if n > reply_width:
                raise ValueError(f"row {i}: {side} reply of {n} tokens is wider than {reply_width}")
            start = prompt_width + j * reply_width
            ids[i, start : start + n] = seq[p:]
            attn[i, start : start + n] = 1
            loss[side][i, :n] = mask[p:]
    out = {"input_ids": ids, "attention_mask": attn, "chosen_loss_mask": loss["chosen"],
           "rejected_loss_mask": loss["rejected"], "margin": np.asarray([ex.margin for ex in examples], np.float32)}
    if examples[0].ref_chosen_logps is not None:
        out["ref_chosen_logps"] = np.asarray([ex.ref_chosen_logps for ex in examples], dtype=np.float32)
        out["ref_rejected_logps"] = np.asarray([ex.ref_rejected_logps for ex in examples], dtype=np.float32)
    return out


def pair_shared_widths(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """(prompt, reply) slot widths of a :func:`collate_pair_shared` batch: rows are P + 2R wide, the loss masks R."""
    reply = batch["chosen_loss_mask"].shape[1]
    return batch["input_ids"].shape[1] - 2 * reply, reply


def widen_pair_shared(batch: dict[str, np.ndarray], prompt_width: int, reply_width: int,
                      pad_id: int) -> dict[str, np.ndarray]:
    """A :func:`collate_pair_shared` batch re-laid to wider prompt and reply slots (micro-batches of one
    optimizer step share one shape): prompts padded on the left, replies on the right."""
    prompt, reply = pair_shared_widths(batch)
    if (prompt, reply) == (prompt_width, reply_width):
        return batch
    out = dict(batch)
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0)):
        a = batch[key]
        parts = [a[:, :prompt], a[:, prompt : prompt + reply], a[:, prompt + reply :]]
        pads = [(prompt_width - prompt, 0), (0, reply_width - reply), (0, reply_width - reply)]
        out[key] = np.concatenate([np.pad(x, ((0, 0), w), constant_values=fill) for x, w in zip(parts, pads)], 1)
    for key in ("chosen_loss_mask", "rejected_loss_mask"):
        out[key] = np.pad(batch[key], ((0, 0), (0, reply_width - reply)))
    return out


def _kto_seq(prompt: np.ndarray, completion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([prompt, completion]).astype(np.int32)
    mask = np.concatenate([np.zeros(prompt.shape[0], np.int8), np.ones(completion.shape[0], np.int8)])
    return ids, mask


def collate_kto(examples: Sequence[KTOExample], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """KTO batch plus the mismatched KL batch (prompt i, completion (i-1) mod B), cut to ``length``."""
    return collate_kto_rows(examples, [examples[j] for j in kl_rotation(len(examples))], length, pad_id)


def collate_kto_rows(examples: Sequence[KTOExample], partners: Sequence[KTOExample], length: int,
                     pad_id: int) -> dict[str, np.ndarray]:
    """KTO rows plus their KL rows (prompt of ``examples[i]``, completion of ``partners[i]``), cut to ``length``:
    a host building only some rows of a batch passes each row's partner in the whole batch."""
    out = _pad_right([_kto_seq(ex.prompt_ids, ex.completion_ids) for ex in examples], length, pad_id)
    kl = _pad_right([_kto_seq(ex.prompt_ids, p.completion_ids) for ex, p in zip(examples, partners)], length, pad_id)
    out["label"] = np.asarray([ex.label for ex in examples], dtype=bool)
    out.update({f"kl_{k}": v for k, v in kl.items()})
    return out


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) [len(seqs), length], each sequence's last ``length`` tokens at the right edge
    (where generation continues)."""
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    attn = np.zeros((len(seqs), length), dtype=np.int32)
    for i, seq in enumerate(seqs):
        seq = list(seq)[-length:]
        ids[i, length - len(seq) :] = seq
        attn[i, length - len(seq) :] = 1
    return ids, attn


def collate_prompt(examples: Sequence[PromptExample], length: int, pad_id: int) -> dict[str, Any]:
    """Prompt batch, LEFT padded to ``length`` (generation continues at the right edge)."""
    ids, attn = left_pad([ex.prompt_ids for ex in examples], length, pad_id)
    return {
        "prompt_input_ids": ids,
        "prompt_attention_mask": attn,
        "extras": [dict(ex.extras) for ex in examples],
    }
