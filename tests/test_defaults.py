"""The defaults as users meet them: `jaxalign sft` and `jaxalign rlhf` for every rlhf type with only the
flags a user must give (model, dataset, output dir; GRPO's reward function, PPO's reward model) plus a
step limit and a short max length, on the default mesh over 8 devices with gradient checkpointing on.
Each run must finish and leave a Hugging Face folder that transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxalign.cli import main
from jaxalign.convert.value_head_io import save_reward_model
from jaxalign.models.value_head import RewardModel, ValueHead
from helpers import make_base, short_rows, write_jsonl

TYPES = ["sft", "dpo", "cpo", "simpo", "orpo", "kto", "rm", "grpo", "ppo"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from flax import nnx

    from jaxalign.convert import load_hf_model

    root = tmp_path_factory.mktemp("defaults")
    base = make_base(root / "base", seed=11)
    rows = short_rows(16, seed=12)
    files = {
        "sft": write_jsonl(root / "sft.jsonl", rows),
        "pairs": write_jsonl(root / "pairs.jsonl", [{**r, "rejected_response": r["solution"] + "7"} for r in rows]),
        "kto": write_jsonl(root / "kto.jsonl", [{**r, "label": i % 2 == 0} for i, r in enumerate(rows)]),
    }
    backbone = load_hf_model(base)
    rm = RewardModel(backbone, ValueHead(backbone.config.hidden_size, rngs=nnx.Rngs(3)))
    from transformers import AutoTokenizer

    save_reward_model(rm, root / "rm", tokenizer=AutoTokenizer.from_pretrained(base))
    return {"root": root, "base": base, "files": files, "rm": str(root / "rm")}


def user_command(kind: str, env, out: Path) -> list[str]:
    dataset = {"sft": "sft", "kto": "kto", "grpo": "sft", "ppo": "sft"}.get(kind, "pairs")
    args = ["--model", env["base"], "--dataset", env["files"][dataset], "--output_dir", str(out),
            "--max_steps", "1", "--max_length", "32"]
    if kind == "sft":
        return ["sft", *args]
    extra = {"grpo": ["--reward_funcs", "accuracy"], "ppo": ["--reward_model", env["rm"]]}.get(kind, [])
    return ["rlhf", "--rlhf_type", kind, *args, *extra]


@pytest.mark.parametrize("kind", TYPES)
def test_defaults_run_and_export(kind, env, tmp_path, capsys):
    out = tmp_path / kind
    rc = main(user_command(kind, env, out))
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert (out / "checkpoint-1").is_dir()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    logged = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    assert np.isfinite([r for r in logged if "loss" in r][-1]["loss"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    if kind == "rm":
        assert (out / "value_head.safetensors").is_file()
