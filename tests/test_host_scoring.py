"""GRPO's scoring on several hosts (issue 22): each host calls the Python reward functions on its block of rows
only, reward models (collective) on every row, and every host ends with the one-host totals; a function failing
on one host fails the others too. Two hosts are threads joined by a barrier all-gather."""

import math
import threading

import numpy as np
import pytest

from threaded_hosts import run_hosts

from jaxalign.errors import JaxalignError
from jaxalign.rewards.host_scoring import host_share, score_on_hosts
from jaxalign.rewards.scoring import score_completions

COMPLETIONS = [f"answer {i}" + "!" * (i % 3) for i in range(8)]
SOLUTIONS = [str(i % 4) for i in range(8)]


class Recorder:
    """A reward function noting the completions each thread gave it."""

    def __init__(self, fn, collective=False):
        self.fn, self.calls = fn, {}
        if collective:
            self.collective = True

    def __call__(self, completions, **columns):
        self.calls.setdefault(threading.current_thread().name, []).extend(completions)
        return self.fn(completions, **columns)


def bangs(completions, solution, **_):
    return [c.count("!") + 0.1 * float(s) if c.count("!") != 2 else None for c, s in zip(completions, solution)]


def length(completions, **_):
    return [len(c) / 10 for c in completions]


def test_host_share_blocks():
    assert [host_share(8, i, 2) for i in range(2)] == [(0, 4), (4, 8)]
    assert host_share(9, 1, 2) == (0, 9)  # does not divide: every host scores every row
    assert host_share(8, 0, 1) == (0, 8)


def test_two_hosts_score_their_rows_and_agree_with_one():
    columns = {"solution": SOLUTIONS, "note": "passed whole"}
    want_total, want = score_completions([("bangs", bangs), ("length", length)], [1.0, 0.5], COMPLETIONS, columns)
    # by hand: row 0 "answer 0": 0 bangs + 0.0, length 0.8 -> 0 + 0.4
    assert math.isclose(want_total[0], 0.4, rel_tol=1e-6) and np.isnan(want["bangs"][2])
    assert math.isclose(want_total[2], 0.5, rel_tol=1e-6)  # None skipped: 0.5 * len("answer 2!!") / 10

    plain, model = Recorder(bangs), Recorder(length, collective=True)
    funcs = [("bangs", plain), ("length", model)]
    results, errors = run_hosts(
        2, lambda i, c, g: score_on_hosts(funcs, [1.0, 0.5], COMPLETIONS, columns, share=host_share(8, i, c), gather=g),
        join=np.concatenate,
    )
    assert errors == [None, None]
    for total, per_func in results:
        np.testing.assert_array_equal(total, want_total)
        for name in want:
            np.testing.assert_array_equal(per_func[name], want[name])
    assert plain.calls == {"host0": COMPLETIONS[:4], "host1": COMPLETIONS[4:]}
    assert model.calls == {"host0": COMPLETIONS, "host1": COMPLETIONS}


def test_shares_out_of_process_order_are_put_back_in_row_order():
    """A host's devices may hold a later block of the batch than the next host's (host 0 rows 4:8, host 1 rows
    0:4): the gathered rewards still come back in row order."""
    columns = {"solution": SOLUTIONS}
    want_total, want = score_completions([("bangs", bangs), ("length", length)], None, COMPLETIONS, columns)
    plain = Recorder(bangs)
    results, errors = run_hosts(
        2, lambda i, c, g: score_on_hosts([("bangs", plain), ("length", length)], None, COMPLETIONS, columns,
                                          share=[(4, 8), (0, 4)][i], gather=g),
        join=np.concatenate,
    )
    assert errors == [None, None] and plain.calls == {"host0": COMPLETIONS[4:], "host1": COMPLETIONS[:4]}
    for total, per_func in results:
        np.testing.assert_array_equal(total, want_total)
        np.testing.assert_array_equal(per_func["bangs"], want["bangs"])


def test_a_failure_on_one_host_fails_both():
    def fails_on_late_rows(completions, **_):
        if "answer 6" in completions:
            raise ValueError("bad row")
        return [0.0] * len(completions)

    funcs = [("late", fails_on_late_rows)]
    _, errors = run_hosts(
        2, lambda i, c, g: score_on_hosts(funcs, None, COMPLETIONS, share=host_share(8, i, c), gather=g),
        join=np.concatenate,
    )
    assert isinstance(errors[1], JaxalignError) and "'late' failed on row 2: ValueError: bad row" in str(errors[1])
    assert isinstance(errors[0], JaxalignError) and "host scoring completion 4" in str(errors[0])
    with pytest.raises(JaxalignError, match="'late' failed on row 6"):
        score_completions(funcs, None, COMPLETIONS)
