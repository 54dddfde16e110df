"""``cosine``: ms-swift's ``CosineReward`` (swift/rewards/orm.py; arXiv 2502.03373).

Correctness comes from the ``accuracy`` reward (correct when it is >= 1). With L the completion length
(see :mod:`jaxalign.rewards.lengths`) and T = ``cosine_max_len``::

    r = hi - (hi - lo) * (1 - cos(pi * L / T)) / 2      # = lo + 0.5 * (hi - lo) * (1 + cos(pi * L / T))

where for a correct answer hi = ``cosine_min_len_value_correct`` (1.0, reached at L = 0) and
lo = ``cosine_max_len_value_correct`` (0.5, at L = T); for a wrong one hi = ``cosine_min_len_value_wrong``
(-0.5, at L = 0) and lo = ``cosine_max_len_value_wrong`` (0.0, at L = T). So short correct answers and
long wrong ones are preferred. As in ms-swift, L is not clamped to T (unreachable when T is
``max_completion_length``, the default).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from jaxalign.errors import ConfigError
from jaxalign.rewards.lengths import completion_lengths
from jaxalign.rewards.math_accuracy import accuracy


def cosine_value(length: float, max_len: float, lo: float, hi: float) -> float:
    """ms-swift ``CosineReward.cosfn``: ``hi`` at length 0, ``lo`` at ``max_len``, cosine in between."""
    return hi - (hi - lo) * (1.0 - math.cos(length * math.pi / max_len)) / 2.0


class CosineReward:
    """Length-scaled correctness reward (ms-swift ``CosineReward``; flags and defaults as ms-swift)."""

    def __init__(
        self,
        cosine_min_len_value_wrong: float = -0.5,
        cosine_max_len_value_wrong: float = 0.0,
        cosine_min_len_value_correct: float = 1.0,
        cosine_max_len_value_correct: float = 0.5,
        cosine_max_len: int | None = None,
        max_completion_length: int = 512,
        tokenizer: Any = None,
        accuracy_func: Callable[..., list[float]] = accuracy,
    ):
        self.min_len_value_wrong = float(cosine_min_len_value_wrong)
        self.max_len_value_wrong = float(cosine_max_len_value_wrong)
        self.min_len_value_correct = float(cosine_min_len_value_correct)
        self.max_len_value_correct = float(cosine_max_len_value_correct)
        self.max_len = int(cosine_max_len if cosine_max_len is not None else max_completion_length)
        if self.max_len <= 0:
            raise ConfigError(f"--cosine_max_len must be a positive number of tokens, got {self.max_len}")
        self.tokenizer = tokenizer
        self.accuracy_func = accuracy_func

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        correctness = self.accuracy_func(completions, **columns)
        lengths = completion_lengths(completions, columns, self.tokenizer)
        rewards = []
        for length, acc in zip(lengths, correctness, strict=True):
            if acc >= 1.0:
                lo, hi = self.max_len_value_correct, self.min_len_value_correct
            else:
                lo, hi = self.max_len_value_wrong, self.min_len_value_wrong
            rewards.append(cosine_value(length, self.max_len, lo, hi))
        return rewards
