"""Hosts as threads: ``run_hosts`` runs one function per simulated host, each with a ``gather`` that is a real
all-gather between the threads (a barrier before and after the exchange), so code written for
``jax.experimental.multihost_utils.process_allgather`` can be tested on one machine without processes."""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np


def run_hosts(count: int, fn: Callable, join: Callable = np.stack) -> tuple[list, list]:
    """``fn(index, count, gather)`` on ``count`` threads named ``host0``, ``host1``, ...; ``gather(x)`` returns
    ``join`` of every thread's ``x`` in host order (``np.stack``: a new leading axis, as ``process_allgather``;
    ``np.concatenate``: the blocks end to end). Returns (results, exceptions), one of each per host."""
    barrier = threading.Barrier(count, timeout=60)
    slots, results, errors = [None] * count, [None] * count, [None] * count

    def host(i):
        def gather(x):
            slots[i] = np.asarray(x)
            barrier.wait()
            out = join(slots)
            barrier.wait()
            return out

        try:
            results[i] = fn(i, count, gather)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors[i] = e

    threads = [threading.Thread(target=host, args=(i,), name=f"host{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
