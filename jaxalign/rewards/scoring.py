"""Scoring a batch of completions with the reward functions, and their metrics.

Totals follow ms-swift: ``total = nansum_k(weight_k * reward_k)`` (``--reward_weights``, default all
1.0); a reward of ``None`` becomes NaN and is left out of the sum. Metric keys are
``rewards/<name>/mean`` and ``rewards/<name>/std`` with the registered name (``accuracy``, ``format``,
...), where ms-swift uses class names (``MathAccuracy``, ``Format``, ``CosineReward``, ...).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping, Sequence

import numpy as np

from jaxalign.errors import ConfigError, JaxalignError
from jaxalign.rewards._text import short_error
from jaxalign.rewards.registry import RewardFunc


def _row_columns(columns: Mapping[str, Any], row: int, n: int) -> dict[str, Any]:
    """Row ``row`` of every column that is a length-``n`` sequence (others are passed whole)."""
    out = {}
    for key, value in columns.items():
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) == n:
            out[key] = value[row : row + 1]
        else:
            out[key] = value
    return out


def _first_failing_row(
    func: RewardFunc, completions: Sequence[str], columns: Mapping[str, Any]
) -> tuple[int, BaseException] | None:
    """Call ``func`` one row at a time to find the first row that raises on its own."""
    n = len(completions)
    for row in range(n):
        try:
            func(list(completions[row : row + 1]), **_row_columns(columns, row, n))
        except Exception as err:
            return row, err
    return None


def _to_floats(name: str, values: Any, n: int) -> np.ndarray:
    """Check a reward function's output: ``n`` real numbers (NaN or None allowed, not inf)."""
    try:
        count = len(values)
    except TypeError:
        raise JaxalignError(
            f"reward function '{name}' returned {type(values).__name__}, expected a list of {n} numbers"
        ) from None
    if isinstance(values, (str, bytes)) or count != n:
        raise JaxalignError(
            f"reward function '{name}' returned {count} values for {n} completions;"
            " it must return one number per completion"
        )
    out = np.empty(n, dtype=np.float64)
    for row, value in enumerate(values):
        if value is None:
            out[row] = math.nan
            continue
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if not isinstance(value, (Real, np.number, np.bool_)) or math.isinf(float(value)):
            raise JaxalignError(
                f"reward function '{name}' returned {value!r} on row {row};"
                " rewards must be finite numbers (or NaN/None to skip)"
            )
        out[row] = float(value)
    return out


def check_weights(funcs: Sequence[tuple[str, RewardFunc]], weights: Sequence[float] | None) -> list[float]:
    """``--reward_weights`` (default all 1.0), one per function."""
    if weights is None:
        return [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(
            f"--reward_weights has {len(weights)} values for {len(funcs)} reward functions "
            f"({', '.join(name for name, _ in funcs)}); give one weight per function"
        )
    return [float(w) for w in weights]


def reward_values(
    funcs: Sequence[tuple[str, RewardFunc]], completions: Sequence[str], columns: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Each function's rewards for ``completions``: {name: [N] float32}, NaN where it returned None.

    Each function is called as ``f(completions, **columns)``. One that raises, or returns the wrong
    number of values or a non-number, raises :class:`JaxalignError` naming it (and the first failing row).
    """
    columns = {} if columns is None else columns
    n = len(completions)
    per_func: dict[str, np.ndarray] = {}
    for name, func in funcs:
        try:
            values = func(list(completions), **columns)
        except JaxalignError:
            raise
        except Exception as err:
            failing = _first_failing_row(func, completions, columns)
            if failing is None:
                raise JaxalignError(f"reward function '{name}' failed: {short_error(err)}") from err
            row, row_err = failing
            raise JaxalignError(f"reward function '{name}' failed on row {row}: {short_error(row_err)}") from err
        per_func[name] = _to_floats(name, values, n).astype(np.float32)
    return per_func


def weighted_total(per_func: Mapping[str, np.ndarray], names: Sequence[str], weights: Sequence[float]) -> np.ndarray:
    """``nansum_k(weight_k * reward_k)`` in ``names`` order, accumulated in float64: [N] float32."""
    total = np.zeros(len(next(iter(per_func.values()))) if per_func else 0, dtype=np.float64)
    for name, weight in zip(names, weights):
        total += np.nan_to_num(per_func[name].astype(np.float64) * float(weight), nan=0.0)
    return total.astype(np.float32)


def score_completions(
    funcs: Sequence[tuple[str, RewardFunc]],
    weights: Sequence[float] | None,
    completions: Sequence[str],
    columns: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Score ``completions``: returns (weighted total [N] float32, {name: rewards [N] float32}) (see
    :func:`reward_values`)."""
    weights = check_weights(funcs, weights)
    per_func = reward_values(funcs, completions, columns)
    return weighted_total(per_func, [name for name, _ in funcs], weights), per_func


def reward_metrics(per_func: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``rewards/<name>/std`` over rows, ignoring NaN; std is unbiased (TRL nanstd)."""
    metrics = {}
    for name, values in per_func.items():
        values = np.asarray(values, dtype=np.float64)
        kept = values[~np.isnan(values)]
        metrics[f"rewards/{name}/mean"] = float(kept.mean()) if kept.size else math.nan
        metrics[f"rewards/{name}/std"] = float(kept.std(ddof=1)) if kept.size > 1 else math.nan
    return metrics
