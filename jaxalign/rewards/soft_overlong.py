"""``soft_overlong``: DAPO's soft overlong punishment as ms-swift's ``SoftOverlong`` computes it.

With L the completion length (see :mod:`jaxalign.rewards.lengths`), L_max = ``soft_max_length``
(default ``max_completion_length``) and L_cache = ``soft_cache_length``::

    r = min(-(L - (L_max - L_cache)) / L_cache, 0)

i.e. 0 up to L_max - L_cache, then falling linearly to -1 at L_max. As in ms-swift's code (and unlike
the DAPO paper / ms-swift docs, which give -1 for L > L_max) it is **not clamped** at -1: it keeps
falling past L_max, which only matters when L_max < max_completion_length.
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxalign.errors import ConfigError
from jaxalign.rewards.lengths import completion_lengths


class SoftOverlong:
    """DAPO soft length penalty (ms-swift ``SoftOverlong``; flags and defaults as ms-swift)."""

    def __init__(
        self,
        soft_cache_length: int | None = None,
        soft_max_length: int | None = None,
        max_completion_length: int = 512,
        tokenizer: Any = None,
    ):
        if soft_cache_length is None:
            raise ConfigError(
                "reward function 'soft_overlong' needs --soft_cache_length (e.g. a quarter of --max_completion_length)"
            )
        max_length = soft_max_length if soft_max_length is not None else max_completion_length
        if not 0 < int(soft_cache_length) < int(max_length):
            raise ConfigError(
                f"--soft_cache_length ({soft_cache_length}) must be > 0"
                f" and smaller than --soft_max_length ({max_length})"
            )
        self.soft_max_length = int(max_length)
        self.soft_cache_length = int(soft_cache_length)
        self.tokenizer = tokenizer

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        expected = self.soft_max_length - self.soft_cache_length
        lengths = completion_lengths(completions, columns, self.tokenizer)
        return [min(-(length - expected) / self.soft_cache_length, 0.0) + 0.0 for length in lengths]  # + 0.0: no -0.0
