import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import IM_END, PAD, ids, tokenizer  # noqa: E402

from jaxalign.data import (  # noqa: E402
    BatchIterator,
    Encoder,
    Example,
    KTOExample,
    PairExample,
    PromptExample,
    SFTExample,
    bucket_for,
    collate_kto,
    make_buckets,
)
from jaxalign.errors import ConfigError  # noqa: E402


def seq(n, start=5):
    """An SFT example of length n whose last two tokens are trained."""
    arr = (np.arange(n) % 60 + start).astype(np.int32)
    mask = np.zeros(n, np.int8)
    mask[-2:] = 1
    return SFTExample(arr, mask, f"row {n}")


def test_make_buckets():
    assert make_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert make_buckets(100) == [64, 100]
    assert make_buckets(64) == [64]
    assert make_buckets(50) == [50]
    assert make_buckets(40, min_length=8) == [8, 16, 32, 40]
    assert make_buckets(2048, buckets=[512, 128, 128]) == [128, 512]
    assert bucket_for(1, [8, 16]) == 8 and bucket_for(8, [8, 16]) == 8 and bucket_for(9, [8, 16]) == 16
    with pytest.raises(ConfigError, match="17 tokens is longer than the largest bucket \\(16\\)"):
        bucket_for(17, [8, 16])


def test_sft_batch_conventions():
    it = BatchIterator([seq(5), seq(7)], 2, [8, 16], seed=0, pad_id=PAD)
    b = next(it)
    assert set(b) == {"input_ids", "attention_mask", "loss_mask"}
    assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32 and b["input_ids"].shape == (2, 8)
    row = {int(m.sum()): i for i, m in enumerate(b["attention_mask"])}
    i5, i7 = row[5], row[7]
    assert b["input_ids"][i5].tolist() == [5, 6, 7, 8, 9, PAD, PAD, PAD]
    assert b["attention_mask"][i5].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert b["loss_mask"][i5].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert b["loss_mask"][i7].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]


def test_loss_mask_first_column_is_zero():
    ex = SFTExample(np.array([5, 6, 7], np.int32), np.array([1, 1, 1], np.int8))
    b = next(BatchIterator([ex, ex], 2, [4], seed=0))
    assert b["loss_mask"].tolist() == [[0, 1, 1, 0]] * 2


def test_batches_share_one_bucket():
    lengths = [3, 5, 9, 12, 17, 30, 31, 6, 14, 20, 2, 33]
    it = BatchIterator([seq(n) for n in lengths], 2, make_buckets(64, min_length=8), seed=1)
    assert len(it) == 5  # buckets 8:{3,5,6,2} 16:{9,12,14} 32:{17,30,31,20} 64:{33} -> 2+1+2+0
    shapes = set()
    for _ in range(len(it)):
        b = next(it)
        n = b["attention_mask"].sum(1)
        L = b["input_ids"].shape[1]
        shapes.add(L)
        assert L == bucket_for(int(n.max()), it.buckets) == bucket_for(int(n.min()), it.buckets)
    assert shapes == {8, 16, 32}


def test_pair_batch_shares_length():
    enc = Encoder(tokenizer(), kind="dpo")
    u = {"role": "user", "content": "1+2="}
    rows = [
        Example([u, {"role": "assistant", "content": "3"}], "a", rejected_messages=[u, {"role": "assistant", "content": "3333333333"}], margin=0.5),
        Example([u, {"role": "assistant", "content": "3"}], "b", rejected_messages=[u, {"role": "assistant", "content": "4"}]),
    ]
    exs = [enc.encode(r) for r in rows]
    assert isinstance(exs[0], PairExample) and exs[0].length == 34
    b = BatchIterator(exs, 2, [16, 32, 64], seed=0, drop_last=False).make_batch([0, 1])
    keys = [f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask")]
    assert sorted(b) == sorted(keys + ["margin"])
    assert all(b[k].shape == (2, 64) for k in keys)
    assert b["margin"].dtype == np.float32 and b["margin"].tolist() == [0.5, 0.0]
    assert b["chosen_attention_mask"].sum(1).tolist() == [25, 25]
    assert b["rejected_attention_mask"].sum(1).tolist() == [34, 25]
    assert b["rejected_loss_mask"][0].sum() == 11 and b["chosen_loss_mask"][1].sum() == 2


def test_kto_kl_pairs_rotate_completions():
    p = [np.array(ids(f"p{i}"), np.int32) for i in range(3)]
    c = [np.array(ids("c" * (i + 1), IM_END), np.int32) for i in range(3)]
    exs = [KTOExample(p[i], c[i], bool(i % 2)) for i in range(3)]
    b = collate_kto(exs, 8, PAD)
    assert b["label"].dtype == np.bool_ and b["label"].tolist() == [False, True, False]
    assert b["input_ids"][0].tolist() == ids("p0c", IM_END) + [PAD] * 4
    assert b["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    # KL row i = prompt i + completion (i - 1) mod B (TRL's KTOTrainer rotation)
    assert b["kl_input_ids"][0].tolist() == ids("p0ccc", IM_END) + [PAD] * 2
    assert b["kl_input_ids"][1].tolist() == ids("p1c", IM_END) + [PAD] * 4
    assert b["kl_input_ids"][2].tolist() == ids("p2cc", IM_END) + [PAD] * 3
    assert b["kl_loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert b["kl_attention_mask"].sum(1).tolist() == [6, 4, 5]
    # The batch length covers the KL rows: lengths 4,5,6 but KL row 0 is 6 -> bucket 8 either way;
    # with buckets [4, 8] a batch of the two shortest rows still fits the longer KL row.
    it = BatchIterator(exs, 2, [4, 5, 8], seed=0, drop_last=False)
    assert it.make_batch([0, 1])["kl_input_ids"].shape == (2, 5)


def test_prompt_batch_left_padded():
    exs = [PromptExample(np.array([7, 8, 9], np.int32), {"solution": "3"}),
           PromptExample(np.array([5], np.int32), {"solution": "1"})]
    b = BatchIterator(exs, 2, [4, 8], seed=0).make_batch([0, 1])
    assert b["prompt_input_ids"].tolist() == [[PAD, 7, 8, 9], [PAD, PAD, PAD, 5]]
    assert b["prompt_attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert b["prompt_input_ids"].dtype == np.int32 and b["prompt_attention_mask"].dtype == np.int32
    assert b["extras"] == [{"solution": "3"}, {"solution": "1"}]


def _take(it, n):
    return [next(it)["input_ids"].tolist() for _ in range(n)]


def test_iterator_is_deterministic_and_reshuffles_each_epoch():
    exs = [seq(4 + i % 20, start=5 + i % 7) for i in range(40)]
    buckets = [8, 16, 32]
    a, b = BatchIterator(exs, 4, buckets, seed=7), BatchIterator(exs, 4, buckets, seed=7)
    assert _take(a, 25) == _take(b, 25)
    assert _take(BatchIterator(exs, 4, buckets, seed=8), 6) != _take(BatchIterator(exs, 4, buckets, seed=7), 6)
    it = BatchIterator(exs, 4, buckets, seed=7)
    plan0, plan1 = it.epoch_plan(0), it.epoch_plan(1)
    assert [p.tolist() for p in plan0] != [p.tolist() for p in plan1]
    for plan in (plan0, plan1):
        used = np.concatenate(plan)
        assert len(set(used.tolist())) == len(used)  # no row twice in an epoch
    assert len(it) == len(plan0) == len(plan1)
    _take(it, len(it))
    assert it.state() == {"epoch": 0, "position": len(it)}
    next(it)
    assert it.state() == {"epoch": 1, "position": 1}


def test_resume_continues_exact_sequence():
    exs = [seq(4 + i % 20) for i in range(30)]
    ref = BatchIterator(exs, 3, [8, 16, 32], seed=3)
    n = len(ref)
    for k in (0, 2, n - 1, n, n + 2):
        run = BatchIterator(exs, 3, [8, 16, 32], seed=3)
        _take(run, k)
        state = run.state()
        expected = _take(run, 5)
        resumed = BatchIterator(exs, 3, [8, 16, 32], seed=3)
        resumed.restore(dict(state))
        assert _take(resumed, 5) == expected, k
    straight = _take(BatchIterator(exs, 3, [8, 16, 32], seed=3), n + 4)
    assert [b["input_ids"].tolist() for b in ref.iter_epoch(1)] == straight[n:] + _take(
        BatchIterator(exs, 3, [8, 16, 32], seed=3), 2 * n)[n + 4:]
    assert ref.state() == {"epoch": 0, "position": 0}
    run = BatchIterator(exs, 3, [8, 16, 32], seed=3)
    first = _take(run, n - 1)
    again = BatchIterator(exs, 3, [8, 16, 32], seed=3)
    again.restore(run.state())
    assert first + _take(again, 5) == straight


def test_drop_last_and_errors():
    exs = [seq(5) for _ in range(5)]
    it = BatchIterator(exs, 2, [8], seed=0)
    assert len(it) == 2 and all(next(it)["input_ids"].shape == (2, 8) for _ in range(6))
    short = BatchIterator(exs, 2, [8], seed=0, drop_last=False)
    assert len(short) == 3
    assert sorted(b.shape[0] for b in (next(short)["input_ids"] for _ in range(3))) == [1, 2, 2]
    with pytest.raises(ConfigError, match="cannot fill one batch of 8"):
        BatchIterator(exs, 8, [8], seed=0)
    with pytest.raises(ConfigError, match="longer than the largest bucket"):
        BatchIterator([seq(9)], 1, [8], seed=0)


def test_host_rows_split_each_global_batch():
    exs = [seq(3 + i % 12) for i in range(24)]
    full = BatchIterator(exs, 4, [8, 16], seed=5)
    shards = [BatchIterator(exs, 4, [8, 16], seed=5, host_rows=(2 * i, 2 * i + 2)) for i in range(2)]
    for _ in range(len(full) + 2):
        whole = next(full)
        parts = [next(s) for s in shards]
        for key in whole:
            assert np.array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ConfigError, match="cannot be split over hosts"):
        BatchIterator(exs, 4, [16], seed=0, drop_last=False, host_rows=(0, 2)).make_batch([0, 1, 2])


def test_kto_host_rows_take_partners_from_the_whole_batch():
    """KTO split over 2 hosts: each host's rows and KL rows equal its half of the whole batch, including the
    padded length, which a long prompt paired with a long completion of another row sets."""
    rng = np.random.default_rng(0)
    exs = []
    for i in range(24):
        prompt, completion = (2 + 9 * (i % 2), 2) if i % 3 else (2, 9)  # long prompts, long completions apart
        exs.append(KTOExample(rng.integers(5, 60, prompt).astype(np.int32),
                              rng.integers(5, 60, completion).astype(np.int32), bool(i % 2)))
    full = BatchIterator(exs, 4, [8, 16, 32], seed=1)
    hosts = [BatchIterator(exs, 4, [8, 16, 32], seed=1, host_rows=(2 * h, 2 * h + 2)) for h in range(2)]
    lengths = set()
    for _ in range(len(full)):
        whole = next(full)
        parts = [next(h) for h in hosts]
        lengths.add(whole["input_ids"].shape[1])
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)
    # rows hold at most 13 tokens (bucket 16); a KL pair of an 11-token prompt and a 9-token completion holds 20
    assert lengths == {8, 32}
