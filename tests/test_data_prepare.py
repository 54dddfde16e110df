import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import PAD, tokenizer, write_jsonl  # noqa: E402

from jaxalign.data import BatchIterator, make_buckets, prepare_data  # noqa: E402
from jaxalign.demo import make_addition_rows, make_kto_rows, make_preference_rows, make_prompt_rows  # noqa: E402
from jaxalign.errors import DataError  # noqa: E402


def test_sft_end_to_end(tmp_path):
    rows = make_addition_rows(41, seed=0, digits=(1, 3))
    good = write_jsonl(tmp_path / "good.jsonl", rows[:40])
    path = write_jsonl(tmp_path / "train.jsonl", [rows[40], "{oops"])
    data = prepare_data(f"{good}#35,{path}", "sft", tokenizer(), split_dataset_ratio=0.2, ignore_bad_rows=True,
                        max_length=64)
    assert data.stats == {"bad_rows": 1, "deleted_too_long": 0, "no_loss_tokens": 0, "train": 28, "val": 8}
    it = BatchIterator(data.train, 4, make_buckets(64, min_length=32), seed=42, pad_id=PAD)
    b = next(it)
    assert b["input_ids"].shape == (4, 32)
    tok = tokenizer()
    for row_ids, mask in zip(b["input_ids"], b["loss_mask"]):
        answer = tok.decode(row_ids[mask > 0])
        prompt = tok.decode(row_ids[: int(np.argmax(mask))])
        a, c = prompt.split("user\n")[1].split("=")[0].split("+")
        assert answer == f"{int(a) + int(c)}<|im_end|>"
    with pytest.raises(DataError, match=r"train\.jsonl line 2: bad JSON"):
        prepare_data(f"{good},{path}", "sft", tokenizer())


def test_each_task_kind_batches(tmp_path):
    tok = tokenizer()
    cases = {
        "dpo": make_preference_rows(8, seed=1),
        "kto": make_kto_rows(8, seed=1),
        "grpo": make_prompt_rows(8, seed=1),
    }
    for task, rows in cases.items():
        path = write_jsonl(tmp_path / f"{task}.jsonl", rows)
        val = write_jsonl(tmp_path / f"{task}_val.jsonl", rows[:2])
        data = prepare_data(str(path), task, tok, val_dataset=str(val), max_length=64)
        assert data.stats == {"bad_rows": 0, "deleted_too_long": 0, "no_loss_tokens": 0, "train": 8, "val": 2}
        b = next(BatchIterator(data.train, 2, [64], seed=0, pad_id=PAD))
        if task == "dpo":
            assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 64)
        elif task == "kto":
            assert b["kl_input_ids"].shape == (2, 64) and b["label"].shape == (2,)
        else:
            assert b["prompt_input_ids"].shape == (2, 64) and "solution" in b["extras"][0]
            assert tok.decode(b["prompt_input_ids"][0][-11:]) == "<|im_start|>assistant\n"


def test_delete_truncation_counted(tmp_path):
    rows = make_addition_rows(5, seed=2, digits=1) + [
        {"messages": [{"role": "user", "content": "9" * 80}, {"role": "assistant", "content": "9"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(str(path), "sft", tokenizer(), max_length=64)
    assert data.stats["deleted_too_long"] == 1 and data.stats["train"] == 5
    data = prepare_data(str(path), "sft", tokenizer(), max_length=64, truncation_strategy="left")
    assert data.stats["deleted_too_long"] == 0 and data.stats["train"] == 6
    assert max(ex.length for ex in data.train) == 64
