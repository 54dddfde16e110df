"""Scoring a rollout on several hosts: each host runs the Python reward functions (built-in ones and plugins) on its
share of the rows, and one all-gather joins the shares; reward models, which run sharded over the mesh (a
collective), score every row on every host together. On one host this is :func:`score_completions`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxalign.errors import JaxalignError
from jaxalign.rewards.registry import RewardFunc
from jaxalign.rewards.scoring import check_weights, reward_values, weighted_total


def host_share(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """The rows ``lo:hi`` of ``n`` this process scores: an equal block per process in process order (all rows
    when there is one process or ``n`` does not divide)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if count == 1 or n % count:
        return 0, n
    per = n // count
    return index * per, (index + 1) * per


def _all_gather(block: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(block, tiled=True))


def _rows(columns: Mapping[str, Any], lo: int, hi: int, n: int) -> dict[str, Any]:
    """Rows ``lo:hi`` of every column that has one value per completion (others passed whole)."""
    return {k: v[lo:hi] if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n else v for k, v in columns.items()}


def score_on_hosts(
    funcs: Sequence[tuple[str, RewardFunc]],
    weights: Sequence[float] | None,
    completions: Sequence[str],
    columns: Mapping[str, Any] | None = None,
    *,
    share: tuple[int, int] | None = None,
    gather: Callable[[np.ndarray], np.ndarray] = _all_gather,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total [N], {name: rewards [N]}) for every row on every host, each host calling the Python reward
    functions on its ``share`` (default :func:`host_share`; the shares are equal contiguous blocks, in any order
    over the processes) only; ``gather`` concatenates the hosts' [rows, k] blocks. A function that fails on one host fails the step on every host (the others say
    where to look) instead of leaving them waiting."""
    weights = check_weights(funcs, weights)
    columns = {} if columns is None else columns
    n = len(completions)
    lo, hi = share if share is not None else host_share(n)
    on_mesh = [(name, f) for name, f in funcs if getattr(f, "collective", False)]
    on_host = [(name, f) for name, f in funcs if not getattr(f, "collective", False)]
    per_func = reward_values(on_mesh, completions, columns)  # a collective: every host, every row
    if (lo, hi) == (0, n):
        per_func.update(reward_values(on_host, completions, columns))
    elif on_host:
        # [rewards of each function, row index, failed]: the row index puts the blocks back in row order
        k = len(on_host)
        block, error = np.zeros((hi - lo, k + 2), np.float32), None
        block[:, k] = np.arange(lo, hi)
        try:
            part = reward_values(on_host, list(completions[lo:hi]), _rows(columns, lo, hi, n))
            block[:, :k] = np.stack([part[name] for name, _ in on_host], axis=1)
        except JaxalignError as err:
            block[:, -1], error = 1.0, err
        whole = gather(block)
        whole = whole[np.argsort(whole[:, k], kind="stable")]
        if whole[:, -1].any():
            if error is not None:
                raise error
            row = int(np.flatnonzero(whole[:, -1])[0])
            raise JaxalignError(f"a reward function failed on the host scoring completion {row}; its error is in "
                                "that host's output")
        per_func.update({name: whole[:, j] for j, (name, _) in enumerate(on_host)})
    per_func = {name: per_func[name] for name, _ in funcs}
    return weighted_total(per_func, list(per_func), weights), per_func
