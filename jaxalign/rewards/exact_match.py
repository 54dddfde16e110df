"""``exact_match``: 1.0 when the completion's answer equals ``solution`` exactly (jaxalign's own;
the demo's reward). Whitespace, an ``<answer>`` wrapper and end-of-turn tokens are ignored."""

from __future__ import annotations

import re

from jaxalign.errors import DataError

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(pred: str) -> str:
    """The text inside ``<answer>...</answer>`` if present, else ``pred``; stripped."""
    m = _ANSWER_TAG.search(pred)
    return (m.group(1) if m else pred).strip()


def exact_match(pred: str, solution: str) -> bool:
    """True when the completion's answer equals ``solution`` (whitespace and an
    ``<answer>`` wrapper ignored; a trailing ``<|im_end|>``/``<|endoftext|>`` too)."""
    text = pred
    for stop in ("<|im_end|>", "<|endoftext|>"):
        text = text.split(stop)[0]
    return extract_answer(text) == str(solution).strip()


def exact_match_reward(completions: list[str], solution: list | None = None, **_) -> list[float]:
    if solution is None:
        raise DataError("reward function 'exact_match' needs a 'solution' column in the dataset")
    return [1.0 if exact_match(c, str(s)) else 0.0 for c, s in zip(completions, solution)]
