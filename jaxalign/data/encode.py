"""Tokenise normalised examples: chat-template rendering, loss masks and truncation.

Response spans are found by rendering prefixes: for an assistant turn k, the text of
``messages[:k]`` with a generation prompt is where the reply starts, and the text of
``messages[:k+1]`` is where it ends (trailing whitespace after the end-of-turn token, such
as ChatML's newline, belongs to the next prompt, as in ms-swift). Each text piece is
tokenised on its own, so the mask lines up with the ids exactly. A sequence ends with its
last reply's end-of-turn token.

``loss_scale`` uses ms-swift's names: ``last_round`` (default) trains the last assistant
reply, ``default`` every assistant reply, ``all`` every token.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxalign.data.formats import Example, task_kind
from jaxalign.data.template import ChatRenderer
from jaxalign.errors import ConfigError, DataError

LOSS_SCALES: tuple[str, ...] = ("last_round", "default", "all")
TRUNCATION_STRATEGIES: tuple[str, ...] = ("delete", "left", "right")
PROMPT_TRUNCATION_STRATEGIES: tuple[str, ...] = ("delete", "left")


@dataclass(frozen=True)
class SFTExample:
    """One tokenised conversation; ``loss_mask[t]`` is 1 where token t is trained."""

    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # int8 [T]
    where: str = ""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class PairExample:
    """A preference pair: chosen and rejected conversations, each with its loss mask."""

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    margin: float = 0.0
    where: str = ""
    # Filled by --precompute_ref_log_probs: the reference model's sequence log-probs.
    ref_chosen_logps: float | None = None
    ref_rejected_logps: float | None = None

    @property
    def length(self) -> int:
        return int(max(self.chosen_ids.shape[0], self.rejected_ids.shape[0]))

    @property
    def shared_prompt_length(self) -> int:
        """Tokens chosen and rejected share before either's first loss token: the prompt a shared-prefix batch
        (:func:`jaxalign.data.collate.collate_pair_shared`) holds once. 0 when they differ from the start."""
        first = [int(np.argmax(m > 0)) if np.any(m > 0) else len(m) for m in (self.chosen_mask, self.rejected_mask)]
        p = min(first)
        same = self.chosen_ids[:p] == self.rejected_ids[:p]
        return int(p if same.all() else np.argmin(same))


@dataclass(frozen=True)
class KTOExample:
    """A KTO row split at the last reply: the loss covers ``completion_ids`` only."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    label: bool
    where: str = ""

    @property
    def length(self) -> int:
        return int(self.prompt_ids.shape[0] + self.completion_ids.shape[0])


@dataclass(frozen=True)
class PromptExample:
    """A GRPO/PPO prompt rendered with the generation prompt, plus its extra columns."""

    prompt_ids: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    where: str = ""

    @property
    def length(self) -> int:
        return int(self.prompt_ids.shape[0])


EncodedExample = SFTExample | PairExample | KTOExample | PromptExample


@dataclass
class EncodeStats:
    """Rows dropped while encoding: too long under ``delete``, or left with no trained token."""

    encoded: int = 0
    deleted_too_long: int = 0
    no_loss_tokens: int = 0

    @property
    def dropped(self) -> int:
        return self.deleted_too_long + self.no_loss_tokens


class Encoder:
    """Turns :class:`Example` objects into token ids and masks for one task kind."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str | None = None,
        model_type: str | None = None,
        max_length: int | None = 2048,
        truncation_strategy: str | None = None,
        loss_scale: str = "last_round",
        kind: str = "sft",
    ):
        self.kind = task_kind(kind)
        allowed = PROMPT_TRUNCATION_STRATEGIES if self.kind == "prompt" else TRUNCATION_STRATEGIES
        if truncation_strategy is None:
            truncation_strategy = "left" if self.kind == "prompt" else "delete"
        if truncation_strategy not in allowed:
            raise ConfigError(
                f"--truncation_strategy {truncation_strategy!r}: choose one of {', '.join(allowed)}"
                + (" for prompt-only (grpo/ppo) data" if self.kind == "prompt" else "")
            )
        if loss_scale not in LOSS_SCALES:
            raise ConfigError(f"--loss_scale {loss_scale!r}: choose one of {', '.join(LOSS_SCALES)}")
        if max_length is not None and int(max_length) < 2:
            raise ConfigError(f"--max_length {max_length}: must be at least 2")
        self.renderer = ChatRenderer(tokenizer, template, model_type=model_type)
        self.tokenizer = tokenizer
        self.max_length = None if max_length is None else int(max_length)
        self.truncation_strategy = truncation_strategy
        self.loss_scale = loss_scale

    # -- whole datasets ------------------------------------------------------------------

    def encode_all(self, examples: list[Example]) -> tuple[list[EncodedExample], EncodeStats]:
        """Encode every example; rows dropped by truncation are counted, not returned."""
        stats = EncodeStats()
        out: list[EncodedExample] = []
        for ex in examples:
            enc = self.encode(ex, stats)
            if enc is not None:
                out.append(enc)
                stats.encoded += 1
        return out, stats

    def encode(self, ex: Example, stats: EncodeStats | None = None) -> EncodedExample | None:
        """Encode one example for this encoder's kind; None when truncation drops it."""
        stats = stats if stats is not None else EncodeStats()
        if self.kind == "sft":
            seq = self._truncate(*self.encode_conversation(ex.messages, where=ex.where, tools=ex.tools)[:2], stats)
            return None if seq is None else SFTExample(seq[0], seq[1], ex.where)
        if self.kind == "pair":
            assert ex.rejected_messages is not None
            chosen = self.encode_conversation(ex.messages, where=ex.where, tools=ex.tools)
            rejected = self.encode_conversation(ex.rejected_messages, where=ex.where, tools=ex.tools)
            c = self._truncate(chosen[0], chosen[1], stats)
            r = self._truncate(rejected[0], rejected[1], stats) if c is not None else None
            if c is None or r is None:
                return None
            return PairExample(c[0], c[1], r[0], r[1], float(ex.margin or 0.0), ex.where)
        if self.kind == "kto":
            return self._encode_kto(ex, stats)
        return self._encode_prompt(ex, stats)

    # -- pieces ----------------------------------------------------------------------------

    def encode_conversation(
        self, messages: list[dict[str, Any]], *, where: str = "", loss_scale: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Ids, loss mask and the number of tokens before the last reply (untruncated)."""
        loss_scale = loss_scale or self.loss_scale
        render = functools.partial(self.renderer.render, tools=tools)
        full = render(messages, add_generation_prompt=False, where=where)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not replies or replies[-1] != len(messages) - 1:
            raise DataError(f"{where}: the conversation must end with an assistant reply")
        trained = replies if loss_scale in ("default", "all") else replies[-1:]
        spans = [self._reply_span(messages, k, full, where, render) for k in trained]
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            raise DataError(f"{where}: assistant replies overlap in the rendered chat template; pass --template plain")
        ids: list[int] = []
        mask: list[int] = []
        pos = 0
        for start, end in spans:
            prompt_ids = self.renderer.encode_text(full[pos:start])
            reply_ids = self.renderer.encode_text(full[start:end])
            ids += prompt_ids + reply_ids
            mask += [0] * len(prompt_ids) + [1] * len(reply_ids)
            pos = end
        prompt_len = len(ids) - len(reply_ids)
        mask_arr = np.asarray(mask, dtype=np.int8)
        if loss_scale == "all":
            mask_arr[:] = 1
        if mask_arr.size:
            mask_arr[0] = 0  # nothing predicts the first token
        return np.asarray(ids, dtype=np.int32), mask_arr, prompt_len

    def _reply_span(self, messages: list[dict[str, Any]], k: int, full: str, where: str, render) -> tuple[int, int]:
        """Character span of assistant reply ``k`` in ``full`` (its end-of-turn token included), rendering prefixes
        with ``render`` (the renderer's, with the row's tools)."""
        prefix = render(messages[:k], add_generation_prompt=True, where=where)
        start = _common_prefix_len(prefix, full)
        if start < len(prefix):
            # The generation prompt may differ from a past reply's header (a think block), but the turns before
            # the reply must render alike, or the span would start inside them (a template that puts tools before
            # the last user turn moves them when later turns follow).
            before = render(messages[:k], add_generation_prompt=False, where=where)
            if _common_prefix_len(before, full) < len(before):
                raise DataError(
                    f"{where}: the chat template renders the turns before assistant reply {k} differently once later "
                    f"turns follow, so that reply cannot be masked on its own; pass --loss_scale last_round"
                )
        if k == len(messages) - 1:
            end = len(full)
        else:
            upto = render(messages[: k + 1], add_generation_prompt=False, where=where)
            end = _common_prefix_len(upto, full)
            if end < len(upto):
                # The template renders a final reply unlike a past one (e.g. Qwen3's <think>
                # block): end the span after this reply's text and the end-of-turn token.
                content = messages[k]["content"]
                found = full.find(content, start) if content else -1
                if found < 0:
                    raise DataError(
                        f"{where}: could not locate assistant reply {k} in the rendered chat template; "
                        "pass --template plain"
                    )
                end = found + len(content)
                eos = getattr(self.tokenizer, "eos_token", None)
                if eos and full.startswith(eos, end):
                    end += len(eos)
        while end > start and full[end - 1].isspace():
            end -= 1
        if end <= start:
            raise DataError(
                f"{where}: could not locate assistant reply {k} in the rendered chat template; pass --template plain"
            )
        return start, end

    def encode_prompt(self, messages: list[dict[str, Any]], *, where: str = "",
                      tools: list[dict[str, Any]] | None = None) -> np.ndarray:
        """Ids of the prompt with the assistant turn opened (untruncated)."""
        text = self.renderer.render(messages, add_generation_prompt=True, where=where, tools=tools)
        return np.asarray(self.renderer.encode_text(text), dtype=np.int32)

    def _encode_kto(self, ex: Example, stats: EncodeStats) -> KTOExample | None:
        ids, _, prompt_len = self.encode_conversation(ex.messages, where=ex.where, loss_scale="last_round",
                                                      tools=ex.tools)
        prompt, completion = ids[:prompt_len], ids[prompt_len:]
        limit = self.max_length
        if limit is not None and ids.shape[0] > limit:
            if self.truncation_strategy == "delete":
                stats.deleted_too_long += 1
                return None
            if self.truncation_strategy == "left":
                cut = ids.shape[0] - limit
                prompt, completion = prompt[min(cut, prompt.shape[0]):], completion[max(0, cut - prompt_len):]
            else:
                completion = completion[: max(0, limit - prompt.shape[0])]
                prompt = prompt[:limit]
        if completion.shape[0] == 0 or (prompt.shape[0] == 0 and completion.shape[0] < 2):
            stats.no_loss_tokens += 1
            return None
        return KTOExample(prompt, completion, bool(ex.label), ex.where)

    def _encode_prompt(self, ex: Example, stats: EncodeStats) -> PromptExample | None:
        ids = self.encode_prompt(ex.messages, where=ex.where, tools=ex.tools)
        if self.max_length is not None and ids.shape[0] > self.max_length:
            if self.truncation_strategy == "delete":
                stats.deleted_too_long += 1
                return None
            ids = ids[-self.max_length :]
        return PromptExample(ids, dict(ex.extras), list(ex.messages), ex.where)

    def _truncate(
        self, ids: np.ndarray, mask: np.ndarray, stats: EncodeStats
    ) -> tuple[np.ndarray, np.ndarray] | None:
        limit = self.max_length
        if limit is not None and ids.shape[0] > limit:
            if self.truncation_strategy == "delete":
                stats.deleted_too_long += 1
                return None
            if self.truncation_strategy == "left":
                ids, mask = ids[-limit:], mask[-limit:].copy()
                mask[0] = 0
            else:
                ids, mask = ids[:limit], mask[:limit]
        if not mask.any():
            stats.no_loss_tokens += 1
            return None
        return ids, mask


def _common_prefix_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))
