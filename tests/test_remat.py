"""Gradient checkpointing changes memory, not numbers: two steps of every algorithm family that merges a
model inside its loss (DPO against a second reference model, KTO and GRPO against the starting model, RM
with evaluation under ``lax.map``) log the same losses and gradient norms and end at the same weights
with ``--gradient_checkpointing`` on (the default) and off, and with the other ``--remat_policy`` choices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.cli import main
from helpers import make_base, short_rows, write_jsonl

PLUGIN = '''
from jaxalign.rewards import register


@register("remat_test_charsum")
def charsum(completions, **kwargs):
    return [(sum(map(ord, c)) % 7) / 6.0 for c in completions]
'''

RUNS = {
    "dpo": ["--rlhf_type", "dpo", "--dataset", "{pairs}", "--ref_model", "{ref}", "--val_dataset", "{pairs}",
            "--eval_steps", "1"],
    "kto": ["--rlhf_type", "kto", "--dataset", "{kto}", "--per_device_train_batch_size", "4"],
    "grpo": ["--rlhf_type", "grpo", "--dataset", "{sft}", "--reward_funcs", "remat_test_charsum",
             "--external_plugins", "{plugin}", "--num_generations", "4", "--max_completion_length", "6",
             "--learning_rate", "1e-3"],
    "rm": ["--rlhf_type", "rm", "--dataset", "{pairs}", "--val_dataset", "{pairs}", "--eval_steps", "1"],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("remat")
    rows = short_rows(16, seed=21)
    (root / "plugin.py").write_text(PLUGIN)
    return {
        "base": make_base(root / "base", seed=22),
        "ref": make_base(root / "ref", seed=23),
        "sft": write_jsonl(root / "sft.jsonl", rows),
        "pairs": write_jsonl(root / "pairs.jsonl", [{**r, "rejected_response": r["solution"] + "1"} for r in rows]),
        "kto": write_jsonl(root / "kto.jsonl", [{**r, "label": i % 3 != 0} for i, r in enumerate(rows)]),
        "plugin": str(root / "plugin.py"),
    }


def run(kind, env, out, remat: bool, policy: str = "full"):
    args = [a.format(**env) for a in RUNS[kind]] + ["--remat_policy", policy]
    rc = main(["rlhf", "--model", env["base"], "--output_dir", str(out), "--max_steps", "2", "--max_length", "32",
               "--mesh", "data=1,fsdp=1,tensor=1", "--logging_steps", "1", "--learning_rate", "1e-3",
               "--gradient_checkpointing", str(remat).lower(), *args])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    return logs, load_file(str(out / "model.safetensors"))


CASES = [(kind, "full") for kind in RUNS] + [("dpo", "save_dots"), ("grpo", "none")]


@pytest.mark.parametrize("kind,policy", CASES)
def test_remat_on_and_off_agree(kind, policy, env, tmp_path):
    """``--remat_policy`` full (the default) and save_dots recompute the layers' forward in the backward
    pass; none, like ``--gradient_checkpointing false``, keeps it. All give the same numbers."""
    logs_on, weights_on = run(kind, env, tmp_path / "on", True, policy)
    logs_off, weights_off = run(kind, env, tmp_path / "off", False)
    train = [(a, b) for a, b in zip(logs_on, logs_off) if "loss" in a]
    assert len(train) == 2 and len(logs_on) == len(logs_off)
    for a, b in train:
        assert a["grad_norm"] > 0
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    for a, b in zip(logs_on, logs_off):
        for key in a:
            if key.startswith("eval_"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert weights_on.keys() == weights_off.keys()
    moved = False
    for name in weights_on:
        # Adam divides by sqrt(v): an element whose gradient is ~0 moves by up to lr either way, so
        # rounding can shift it by a few 1e-6; a wrong gradient would shift it by ~lr (1e-3).
        np.testing.assert_allclose(weights_on[name], weights_off[name], atol=2e-5)
        moved |= not np.array_equal(weights_on[name], load_file(f"{env['base']}/model.safetensors")[name])
    assert moved
