"""``repetition``: ms-swift's ``RepetitionPenalty`` (swift/rewards/orm.py; arXiv 2502.03373).

Words are the lower-cased whitespace-separated tokens; with ``total`` n-grams of ``repetition_n_grams``
consecutive words, ``unique`` of them distinct::

    r = (1 - unique / total) * repetition_max_penalty

An empty completion, or one with fewer words than n, scores 0.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from jaxalign.errors import ConfigError


def word_ngrams(text: str, n: int) -> Iterator[tuple[str, ...]]:
    """The n-grams of lower-cased whitespace-separated words (ms-swift ``zipngram``)."""
    words = text.lower().split()
    return zip(*[words[i:] for i in range(n)])


class RepetitionPenalty:
    """N-gram repetition penalty (ms-swift ``RepetitionPenalty``; flags and defaults as ms-swift)."""

    def __init__(self, repetition_n_grams: int = 3, repetition_max_penalty: float = -1.0):
        if int(repetition_n_grams) < 1:
            raise ConfigError(f"--repetition_n_grams must be >= 1, got {repetition_n_grams}")
        if float(repetition_max_penalty) > 0:
            raise ConfigError(
                f"--repetition_max_penalty must be <= 0 (a penalty), got {repetition_max_penalty}"
            )
        self.ngram_size = int(repetition_n_grams)
        self.max_penalty = float(repetition_max_penalty)

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        rewards = []
        for text in completions:
            if text == "" or len(text.split()) < self.ngram_size:
                rewards.append(0.0)
                continue
            ngrams = list(word_ngrams(text, self.ngram_size))
            scaling = 1.0 - len(set(ngrams)) / len(ngrams)
            rewards.append(scaling * self.max_penalty)
        return rewards
