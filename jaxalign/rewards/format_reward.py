"""``format``: ms-swift's ``Format`` reward (swift/rewards/orm.py)."""

from __future__ import annotations

import re
from typing import Any, Sequence

# ms-swift's pattern, matched with re.DOTALL | re.MULTILINE from the start of the completion;
# (?![\s\S]) is "end of string" (``$`` would also accept a final newline, or any line end under MULTILINE).
FORMAT_PATTERN = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL | re.MULTILINE)


def format_reward(completions: Sequence[str], **columns: Any) -> list[float]:
    """1.0 when the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0."""
    return [1.0 if FORMAT_PATTERN.match(text) else 0.0 for text in completions]
