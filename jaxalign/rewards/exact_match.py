"""``exact_match``: 1.0 when the completion's answer equals ``solution`` exactly (jaxalign's own;
the demo's reward). Whitespace, an ``<answer>`` wrapper and end-of-turn tokens are ignored."""

from __future__ import annotations

from jaxalign.errors import DataError


def exact_match_reward(completions: list[str], solution: list | None = None, **_) -> list[float]:
    from jaxalign.data.synthetic import exact_match

    if solution is None:
        raise DataError("reward function 'exact_match' needs a 'solution' column in the dataset")
    return [1.0 if exact_match(c, str(s)) else 0.0 for c, s in zip(completions, solution)]
