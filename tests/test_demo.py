"""`jaxalign demo` end to end with few steps: every stage runs and summary.json holds its figures."""

import json

from jaxalign import cli


def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--output_dir", str(out), "--sft_steps", "4", "--dpo_steps", "2", "--rm_steps", "2",
                   "--grpo_steps", "1", "--ppo_steps", "1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"sft", "dpo", "rm", "grpo", "ppo"}
    for stage in ("sft", "dpo", "grpo", "ppo"):
        acc = summary[stage]["heldout_exact_match_after"]
        assert 0.0 <= acc <= 1.0
        assert summary[stage]["compilations"] == 1
    assert summary["sft"]["heldout_loss_after"] < summary["sft"]["heldout_loss_before"]
    assert "heldout_rm_score_after" in summary["ppo"] and "heldout_preference_accuracy_after" in summary["rm"]
    assert (out / "curves.png").stat().st_size > 0
    for stage in ("sft", "dpo", "grpo", "ppo"):
        assert (out / stage / "config.json").exists()  # each stage exported a Hugging Face folder
    assert (out / "rm" / "value_head.safetensors").exists()
    # A second run into the same folder replaces the previous demo; another non-empty folder is refused.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert cli.main(["demo", "--output_dir", str(other), "--sft_steps", "1"]) == 2
    assert (other / "keep.txt").exists()
    assert "not a jaxalign demo folder" in capsys.readouterr().err
