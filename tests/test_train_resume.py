"""Exact resume: a run stopped after step K's checkpoint and resumed with
`--resume_from_checkpoint latest` logs the losses an uninterrupted run logs at steps K+1..N."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.cli import main
from helpers import TINY, cli_args, long_rows, make_base, read_jsonl, short_rows, write_jsonl

N, K = 6, 3
# 16 + 16 rows, micro-batches of 4, 2 a step: 4 steps an epoch, so the resumed part crosses an epoch.
OPTIONS = {**TINY, "max_steps": N, "save_steps": K, "per_device_train_batch_size": 4,
           "gradient_accumulation_steps": 2, "warmup_ratio": 0.2, "weight_decay": 0.1, "learning_rate": 3e-3}
METRICS = ("loss", "grad_norm", "learning_rate", "token_acc", "epoch")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    base = make_base(root / "base", seed=5)
    data = write_jsonl(root / "train.jsonl", short_rows(16, seed=6) + long_rows(16, seed=7))
    out = root / "out"
    argv = ["sft", "--model", base, "--dataset", data, "--output_dir", str(out), *cli_args(OPTIONS)]
    assert main(argv) == 0
    full = read_jsonl(out / "logging.jsonl")
    full_weights = load_file(str(out / "model.safetensors"))
    # The run "dies" right after checkpoint-K was written: later checkpoints never existed.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{K}", f"checkpoint-{N}"]
    shutil.rmtree(out / f"checkpoint-{N}")
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    resumed = read_jsonl(out / "logging.jsonl")[len(full):]
    return dict(full=full, resumed=resumed, full_weights=full_weights, out=out)


def test_resumed_losses_equal_uninterrupted_run(runs):
    full = {r["step"]: r for r in runs["full"] if "loss" in r}
    resumed = {r["step"]: r for r in runs["resumed"] if "loss" in r}
    assert sorted(full) == list(range(1, N + 1))
    assert sorted(resumed) == list(range(K + 1, N + 1))
    for step in resumed:
        for key in METRICS:
            np.testing.assert_allclose(resumed[step][key], full[step][key], rtol=1e-6, err_msg=f"step {step} {key}")
    # The losses move from step to step, so a resume from the wrong data position or params would show.
    assert len({round(full[s]["loss"], 5) for s in range(K + 1, N + 1)}) == N - K
    # The schedule continued: warm-up over 1 step (0.2 * 6 rounded), then cosine over 5.
    assert full[1]["learning_rate"] == 0.0 and full[2]["learning_rate"] == pytest.approx(3e-3)


def test_resumed_final_weights_equal_uninterrupted_run(runs):
    resumed = load_file(str(runs["out"] / "model.safetensors"))
    assert resumed.keys() == runs["full_weights"].keys()
    for k, v in runs["full_weights"].items():
        np.testing.assert_allclose(resumed[k], v, rtol=0, atol=1e-6, err_msg=k)
    assert sorted(p.name for p in runs["out"].glob("checkpoint-*")) == [f"checkpoint-{K}", f"checkpoint-{N}"]
