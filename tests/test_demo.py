"""`jaxalign demo` end to end with few steps: every stage runs and summary.json holds its figures."""

import json

import pytest

from jaxalign import cli


def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--output_dir", str(out), "--sft_steps", "4", "--dpo_steps", "2", "--rm_steps", "2",
                   "--grpo_steps", "1", "--ppo_steps", "1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"sft", "dpo", "dpo_lora", "rm", "grpo", "ppo"}
    for stage in ("sft", "dpo", "dpo_lora", "grpo", "ppo"):
        acc = summary[stage]["heldout_exact_match_after"]
        assert 0.0 <= acc <= 1.0 and 0.0 <= summary[stage]["heldout_carry_slips_after"] <= 1.0
        assert summary[stage]["compilations"] == 1
    for stage in ("dpo", "dpo_lora", "grpo", "ppo"):  # each starts from the SFT model
        assert summary[stage]["heldout_carry_slips_before"] == summary["sft"]["heldout_carry_slips_after"]
    grpo = summary["grpo"]
    assert 0.0 <= grpo["train_prompts_sampled_reward_before"] <= 1.0 and 0.0 <= grpo["train_prompts_sampled_reward_after"] <= 1.0
    # The SFT rows come from the sloppy teacher: about 0.7 x 45% of the 4000 rows forget a carry.
    teacher = summary["sft_teacher"]
    assert teacher["carry_slip"] == 0.7 and 1000 < teacher["rows_with_carry_forgotten"] < 1500
    rows = [json.loads(line) for line in (out / "data" / "sft_train.jsonl").read_text().splitlines()]
    said_wrong = sum(r["messages"][-1]["content"].rstrip() != r["solution"] for r in rows)
    assert said_wrong == teacher["rows_with_carry_forgotten"]
    # ... and ends about 60% of its answers with a space; the reward model's pairs are about that space.
    spaced = sum(r["messages"][-1]["content"].endswith(" ") for r in rows)
    assert teacher["stray_space"] == 0.6 and spaced == teacher["rows_with_stray_space"] and 2200 < spaced < 2600
    pairs = [json.loads(line) for line in (out / "data" / "rm_pairs_train.jsonl").read_text().splitlines()]
    assert all(p["rejected_response"] == p["messages"][-1]["content"] + " " for p in pairs)
    assert summary["sft"]["heldout_loss_after"] < summary["sft"]["heldout_loss_before"]
    assert "heldout_preference_accuracy_after" in summary["rm"]
    ppo = summary["ppo"]
    assert ppo["heldout_rm_score_gain"] == ppo["heldout_rm_score_after"] - ppo["heldout_rm_score_before"]
    assert ppo["heldout_stray_space_before"] == summary["sft"]["heldout_stray_space_after"]
    assert {"approxkl_mean", "approxkl_max", "clipfrac_mean", "clipfrac_max", "rollout_kl_last"} <= set(ppo)
    for when in ("before", "after"):
        assert 0.0 <= ppo[f"heldout_sampled_stray_space_{when}"] <= 1.0 and f"heldout_sampled_rm_score_{when}" in ppo
    # curves.png is the whole demo: exact-match bars plus each stage's main curve, read from its log.
    from jaxalign.demo.figure import STAGE_CURVES, read_curve

    assert (out / "curves.png").read_bytes() != (out / "sft" / "curves.png").read_bytes()
    for stage, (key, _) in STAGE_CURVES.items():
        steps, values = read_curve(out / stage / "logging.jsonl", key)
        assert steps and steps[-1] == summary[stage]["steps"], stage
    for stage in ("sft", "dpo", "grpo", "ppo"):
        assert (out / stage / "config.json").exists()  # each stage exported a Hugging Face folder
    assert (out / "rm" / "value_head.safetensors").exists()
    assert (out / "dpo_lora" / "adapter_model.safetensors").exists()  # the LoRA stage's PEFT adapter
    assert read_curve(out / "dpo_lora" / "logging.jsonl", "rewards/margins")[0][-1] == summary["dpo_lora"]["steps"]
    # A second run into the same folder replaces the previous demo; another non-empty folder is refused.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert cli.main(["demo", "--output_dir", str(other), "--sft_steps", "1"]) == 2
    assert (other / "keep.txt").exists()
    assert "not a jaxalign demo folder" in capsys.readouterr().err


def test_ppo_movement_summarises_the_logged_updates():
    from jaxalign.demo.pipeline import ppo_movement, stray_spaces

    history = [
        {"step": 5, "policy/approxkl_avg": 0.002, "policy/clipfrac_avg": 0.0, "objective/kl": 0.01},
        {"step": 8, "loss": 1.0},  # a row without PPO metrics is skipped
        {"step": 10, "policy/approxkl_avg": 0.004, "policy/clipfrac_avg": 0.03, "objective/kl": 0.07},
    ]
    moved = ppo_movement(history)
    assert moved == pytest.approx({"approxkl_mean": 0.003, "approxkl_max": 0.004, "clipfrac_mean": 0.015,
                                   "clipfrac_max": 0.03, "rollout_kl_last": 0.07})
    assert ppo_movement([{"step": 1, "loss": 2.0}]) == {}
    assert stray_spaces(["85 ", "85", "7 ", "102"]) == 0.5 and stray_spaces([]) == 0.0


def test_carry_slips_counts_forgotten_carries_among_carry_sums():
    from jaxalign.demo import carry_slips

    rows = [{"messages": [{"role": "user", "content": p}], "solution": s}
            for p, s in [("47+38=", "85"), ("7+8=", "15"), ("41+38=", "79"), ("95+7=", "102")]]
    # Carry sums: 47+38 (said 75: forgot), 7+8 (said 15: right), 95+7 (said 93: wrong, but not the slip).
    # 41+38 has no carry and does not count, whatever was said.
    assert carry_slips(rows, ["75", "15", "69", "93"]) == 1 / 3
    assert carry_slips(rows, ["75", "5", "79", "92"]) == 1.0
    assert carry_slips(rows[2:3], ["69"]) == 0.0
