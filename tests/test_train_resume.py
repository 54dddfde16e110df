"""Exact resume: a run stopped after step K's checkpoint and resumed with
`--resume_from_checkpoint latest` logs the losses an uninterrupted run logs at steps K+1..N; and a run
killed with SIGTERM mid-run (a preemption) saves the step it was on, exports nothing, and resumes to the
uninterrupted run's losses and weights with every step logged once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.cli import main
from helpers import REPO, TINY, cli_args, long_rows, make_base, read_jsonl, short_rows, write_jsonl

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
    log = read_jsonl(out / "logging.jsonl")
    # The resumed run kept the log up to step K and logged K+1..N once more (no duplicates).
    assert log[: sum(r["step"] <= K for r in full)] == [r for r in full if r["step"] <= K]
    resumed = [r for r in log if r["step"] > K]
    return dict(full=full, resumed=resumed, full_weights=full_weights, out=out, root=root, argv=argv, log=log)


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


# A child `jaxalign sft` whose steps from K+2 on take 2 s more and which touches a marker file when it enters
# step K+2: the SIGTERM sent once the marker exists lands in the middle of that step (the real signal, from
# outside; waiting for a logged step instead raced with the end of step K+1).
CHILD = """
import pathlib, sys, time
from jaxalign.trainers.trainer import Trainer
step_on, calls = Trainer.step_on, []
def slow_step_on(self, batches):
    calls.append(1)
    if len(calls) >= {slow_from}:
        pathlib.Path({marker!r}).touch()
        time.sleep(2.0)
    return step_on(self, batches)
Trainer.step_on = slow_step_on
from jaxalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _logged_steps(path) -> list[int]:
    try:
        return [r["step"] for r in read_jsonl(path)]
    except (OSError, ValueError):  # not there yet, or a line half-written
        return []


def test_sigterm_mid_run_saves_the_step_and_resumes_exactly(runs):
    root, argv = runs["root"], list(runs["argv"])
    out = root / "preempted"
    argv[argv.index("--output_dir") + 1] = str(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(root / "child.err", "w") as err:
        marker = root / "in_step_k_plus_2"
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(slow_from=K + 2, marker=str(marker)), *argv],
                                 cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while not marker.exists():
            assert child.poll() is None, "the run ended before it could be interrupted"
            assert time.time() < deadline, "the run did not reach step K+1"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        rc = child.wait(timeout=300)
    stopped = _logged_steps(out / "logging.jsonl")[-1]
    assert K + 2 <= stopped <= N
    last = (root / "child.err").read_text().replace("\r", "\n").strip().splitlines()[-1]
    assert rc == 128 + signal.SIGTERM, last
    assert last == (f"jaxalign: preempted at step {stopped} (SIGTERM); saved {out}/checkpoint-{stopped}; "
                    "resume with --resume_from_checkpoint latest")
    # The step it was on is a complete checkpoint; nothing was exported, no temporary folder is left.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{K}", f"checkpoint-{stopped}"})
    assert (out / f"checkpoint-{stopped}" / "meta").exists()
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not list(root.glob(".preempted.tmp-*"))
    assert _logged_steps(out / "logging.jsonl") == list(range(1, stopped + 1))

    # The resume finishes the run.
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    log = read_jsonl(out / "logging.jsonl")
    assert [r["step"] for r in log] == list(range(1, N + 1))  # every step once
    full = {r["step"]: r for r in runs["full"]}
    for r in log:
        for key in METRICS:
            np.testing.assert_allclose(r[key], full[r["step"]][key], rtol=1e-6, err_msg=f"step {r['step']} {key}")
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == runs["full_weights"].keys()
    for k, v in runs["full_weights"].items():
        np.testing.assert_allclose(weights[k], v, rtol=0, atol=1e-6, err_msg=k)
