"""Each host tokenises one shard (issue 22): two hosts, run as threads joined by a barrier all-gather, end with the
kept rows, lengths and drop counts of one host encoding everything; each encodes only its shard up front and
then only the rows of its own batch slots; their per-host batches put together are the one-host batches."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import tokenizer  # noqa: E402
from threaded_hosts import run_hosts  # noqa: E402

from jaxalign.data import BatchIterator, Encoder, Example  # noqa: E402
from jaxalign.data.shards import AnnotatedRows, HostShard, encode_rows  # noqa: E402
from jaxalign.errors import DataError  # noqa: E402


def conv(prompt, reply):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def examples(n=41):
    """SFT rows of varied length; every 7th too long for max_length 40 (deleted)."""
    rows = []
    for i in range(n):
        reply = "9" * (60 if i % 7 == 3 else 1 + i % 9)
        rows.append(Example(conv(f"{i}+{i}=", reply), f"d.jsonl line {i + 1}"))
    return rows


class CountingEncoder(Encoder):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows: list[str] = []

    def encode(self, ex, stats=None):
        self.rows.append(ex.where)
        return super().encode(ex, stats)


def encoder():
    return CountingEncoder(tokenizer(), kind="sft", max_length=40, truncation_strategy="delete")


def test_two_hosts_know_every_row_and_encode_their_share():
    exs = examples()
    whole, whole_stats = encoder().encode_all(exs)
    assert whole_stats.deleted_too_long == 6  # rows 3, 10, ..., 38

    encoders = [encoder(), encoder()]
    results, errors = run_hosts(2, lambda i, n, gather: encode_rows(encoders[i], exs, HostShard(i, n, gather)))
    assert errors == [None, None]
    for host, (rows, stats) in enumerate(results):
        assert (stats.encoded, stats.deleted_too_long, stats.no_loss_tokens) == (len(whole), 6, 0)
        assert rows.lengths.tolist() == [ex.length for ex in whole]
        # up front: only its own shard, rows host, host + 2, ...
        assert encoders[host].rows == [f"d.jsonl line {i + 1}" for i in range(host, len(exs), 2)]

    batch, slots = 6, [(0, 3), (3, 6)]
    one = BatchIterator(whole, batch, [16, 32, 40], seed=3)
    hosts = [BatchIterator(results[h][0], batch, [16, 32, 40], seed=3, host_rows=slots[h]) for h in range(2)]
    steps = len(one) + 2  # into the second epoch
    needed = [set(), set()]
    for _ in range(steps):
        plan = one.epoch_plan(one.epoch)
        idx = plan[one.position] if one.position < len(plan) else one.epoch_plan(one.epoch + 1)[0]
        want = next(one)
        for h, it in enumerate(hosts):
            needed[h] |= {whole[i].where for i in idx[slots[h][0] : slots[h][1]]}
        parts = [next(it) for it in hosts]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key], err_msg=key)
    for h in range(2):
        own = {f"d.jsonl line {i + 1}" for i in range(h, len(exs), 2)}
        assert set(encoders[h].rows[len(own):]) == needed[h] - own  # later: only its slots' rows from other shards


def test_a_row_that_fails_raises_on_every_host():
    exs = examples(6)
    exs[3] = Example([{"role": "assistant", "content": "no prompt"}], "d.jsonl line 4")
    with pytest.raises(Exception) as one:
        encoder().encode_all(exs)
    _, errors = run_hosts(2, lambda i, n, gather: encode_rows(encoder(), exs, HostShard(i, n, gather)))
    for e in errors:  # row 3 belongs to host 1; host 0 raises the same error for it
        assert e is not None and type(e) is type(one.value) and str(e) == str(one.value), e
    assert isinstance(one.value, DataError)


def test_annotated_rows_set_values_on_read_without_encoding_other_shards():
    """--precompute_ref_log_probs annotates every row; reading row i annotates (and encodes) row i only."""
    exs = [Example(conv(f"{i}+{i}=", str(2 * i)), f"p.jsonl line {i + 1}", rejected_messages=conv(f"{i}+{i}=", "7"))
           for i in range(10)]
    encoders = [CountingEncoder(tokenizer(), kind="dpo", max_length=40), CountingEncoder(tokenizer(), kind="dpo",
                                                                                          max_length=40)]
    results, errors = run_hosts(2, lambda i, n, gather: encode_rows(encoders[i], exs, HostShard(i, n, gather)))
    assert errors == [None, None]
    rows, enc = results[0][0], encoders[0]
    up_front = list(enc.rows)
    assert up_front == [f"p.jsonl line {i + 1}" for i in range(0, 10, 2)]
    chosen, rejected = np.arange(10) * 0.5 - 3.0, -np.arange(10) * 0.25
    view = AnnotatedRows(rows, {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected})
    assert len(view) == 10 and view.encoded_here == 5
    np.testing.assert_array_equal(view.lengths, rows.lengths)
    assert enc.rows == up_front  # building the view encodes nothing
    row = view[3]  # host 1's row, encoded now, and no other
    assert (row.ref_chosen_logps, row.ref_rejected_logps) == (-1.5, -0.75)
    assert row.where == "p.jsonl line 4" and enc.rows == [*up_front, "p.jsonl line 4"]
    np.testing.assert_array_equal(row.chosen_ids, rows[3].chosen_ids)
    assert [r.ref_chosen_logps for r in view[0:3]] == [-3.0, -2.5, -2.0]


def test_hosts_parse_and_validate_only_their_rows(tmp_path, monkeypatch):
    """On several hosts each parses and validates its shard of a .jsonl file; every host ends with the one-host
    examples and bad-row count, and a bad row without --ignore_bad_rows stops every host with the same error."""
    import json
    import threading

    from jaxalign.data import loading
    from jaxalign.data.prepare import load_examples

    lines = [json.dumps({"messages": conv(f"{i}+{i}=", str(2 * i))}) for i in range(12)]
    lines[5] = "{not json"
    lines[8] = json.dumps({"messages": [{"role": "user", "content": "no reply"}]})
    lines.insert(3, "   ")  # blank lines are skipped, as on one host
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")

    one, one_bad = load_examples(str(path), "sft", ignore_bad_rows=True)
    assert one_bad == 2 and len(one) == 10
    parsed: dict[str, list[int]] = {}
    real = loading.parse_jsonl_line

    def counting(raw, p, lineno):
        parsed.setdefault(threading.current_thread().name, []).append(lineno)
        return real(raw, p, lineno)

    monkeypatch.setattr(loading, "parse_jsonl_line", counting)
    results, errors = run_hosts(2, lambda i, n, g: load_examples(str(path), "sft", ignore_bad_rows=True,
                                                                 shard=HostShard(i, n, g)))
    assert errors == [None, None]
    # the 12 non-blank lines are lines 1-3 and 5-13; host 0 parses the 1st, 3rd, ... of them, host 1 the others
    assert parsed == {"host0": [1, 3, 6, 8, 10, 12], "host1": [2, 5, 7, 9, 11, 13]}
    for examples, bad in results:
        assert bad == 2 and [(e.where, e.messages) for e in examples] == [(e.where, e.messages) for e in one]

    with pytest.raises(DataError) as alone:
        load_examples(str(path), "sft")  # one host: the bad JSON on line 7 stops the load
    assert "line 7: bad JSON" in str(alone.value)
    _, errors = run_hosts(2, lambda i, n, g: load_examples(str(path), "sft", shard=HostShard(i, n, g)))
    for e in errors:  # line 7 is host 1's row; both hosts raise for it
        assert isinstance(e, DataError) and str(e).startswith(f"{path} line 7: bad JSON"), e
        assert str(e).endswith("; fix the row or pass --ignore_bad_rows")


def test_columns_renamed_on_one_host_and_on_several(tmp_path):
    """--columns renames a dataset's columns before they are read, whether one host loads the rows or each its
    shard; a bad row is still named by its line."""
    import json

    from jaxalign.data.prepare import load_examples

    lines = [json.dumps({"q": f"{i}+{i}=", "a": str(2 * i), "id": i}) for i in range(6)]
    lines[4] = "{not json"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    columns = {"q": "query", "a": "response"}
    one, bad = load_examples(str(path), "sft", ignore_bad_rows=True, columns=columns)
    assert bad == 1 and [e.messages for e in one] == [conv(f"{i}+{i}=", str(2 * i)) for i in (0, 1, 2, 3, 5)]
    assert [e.extras for e in one] == [{"id": i} for i in (0, 1, 2, 3, 5)]
    results, errors = run_hosts(2, lambda i, n, g: load_examples(str(path), "sft", ignore_bad_rows=True,
                                                                 shard=HostShard(i, n, g), columns=columns))
    assert errors == [None, None]
    for examples, n_bad in results:
        assert n_bad == 1 and [e.messages for e in examples] == [e.messages for e in one]
    none, all_bad = load_examples(str(path), "sft", ignore_bad_rows=True)  # unmapped: no messages, no query
    assert len(none) == 0 and all_bad == 6
