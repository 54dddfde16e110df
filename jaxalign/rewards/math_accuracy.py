"""``accuracy``: ms-swift's ``MathAccuracy`` (swift/rewards/orm.py), 1.0 when the completion's answer
equals ``solution`` according to ``math_verify``, else 0.0.

As ms-swift:

- The text inside ``<answer>...</answer>`` is used when present (for completion and solution alike).
- The gold solution is parsed with math_verify's default extraction (LaTeX, then plain expressions);
  if it cannot be parsed the reward is **0.0** (current ms-swift; older ms-swift/open-r1 gave 1.0).
- A completion with an ``<answer>`` tag is parsed with the default extraction too; one without a tag
  is parsed as LaTeX only, boxed answers first, requiring an anchor (``\\boxed{}``, "final answer is
  $...$"), with ``NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
  boxed="all", units=True)``.
- ``verify(gold, answer)``; an exception in verify gives 0.0.

Addition to ms-swift: when the untagged LaTeX parse finds nothing, the completion is parsed once
more with ``ExprExtractionConfig`` so that plain-number answers ("The answer is 357") are graded
instead of scoring 0.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any, Sequence

from jaxalign.errors import DataError

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TIMEOUT_S = 5


def _timeout() -> int | None:
    """math_verify's timeouts use signal.alarm, which only works on the main thread."""
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=1)
def _configs() -> tuple[list, list]:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    untagged = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]
    return untagged, [ExprExtractionConfig()]


def _inside_answer_tag(text: str) -> tuple[str, bool]:
    match = _ANSWER_TAG.search(text)
    return (match.group(1).strip(), True) if match else (text, False)


def accuracy_one(completion: str, solution: Any) -> float:
    """ms-swift MathAccuracy for one (completion, solution) pair; see the module doc."""
    from math_verify import parse, verify

    untagged_config, plain_config = _configs()
    timeout = _timeout()
    gold_text, _ = _inside_answer_tag(str(solution))
    gold = parse(gold_text, extraction_mode="first_match", parsing_timeout=timeout)
    if len(gold) == 0:
        return 0.0
    text, tagged = _inside_answer_tag(completion)
    if tagged:
        answer = parse(text, extraction_mode="first_match", parsing_timeout=timeout)
    else:
        answer = parse(text, extraction_config=untagged_config, extraction_mode="first_match", parsing_timeout=timeout)
        if len(answer) == 0:
            answer = parse(text, extraction_config=plain_config, extraction_mode="first_match", parsing_timeout=timeout)
    try:
        return float(verify(gold, answer, timeout_seconds=timeout))
    except Exception:  # ms-swift: an error while verifying scores 0
        return 0.0


def accuracy(completions: Sequence[str], solution: Sequence[Any] | None = None, **columns: Any) -> list[float]:
    """1.0 where the completion's answer matches ``solution`` (math_verify), else 0.0 (ms-swift MathAccuracy)."""
    if solution is None:
        raise DataError("reward function 'accuracy' needs a 'solution' column in the dataset (the gold answer)")
    return [accuracy_one(completion, gold) for completion, gold in zip(completions, solution, strict=True)]
