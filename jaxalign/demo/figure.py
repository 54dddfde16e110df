"""The demo's picture: what each stage did to held-out exact match, and each stage's main curve."""

from __future__ import annotations

import json
from pathlib import Path

# Stage -> (metric in its logging.jsonl, panel title): the one curve that says whether the stage learned.
STAGE_CURVES = {
    "sft": ("loss", "SFT: training loss"),
    "dpo": ("rewards/margins", "DPO: reward margin"),
    "rm": ("accuracy", "RM: pair accuracy"),
    "grpo": ("reward", "GRPO: mean reward"),
    "ppo": ("objective/scores", "PPO: reward-model score"),
}
# A second curve on a stage's panel: (label of the main curve, label of the second, its run folder, its metric
# or None for the main one's): the LoRA run of the same DPO; PPO's greedy answers to its fixed sample prompts.
SECOND_CURVES = {
    "dpo": ("full", "LoRA", "dpo_lora", None),
    "ppo": ("rollouts (sampled)", "sample prompts (greedy)", "ppo", "eval/scores"),
}
EXACT_MATCH_STAGES = ("sft", "dpo", "dpo_lora", "grpo", "ppo")


def read_curve(logging_file: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in a run's logging.jsonl; empty when the file or the key is absent."""
    steps, values = [], []
    if not logging_file.exists():
        return steps, values
    for line in logging_file.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
            steps.append(int(row["step"]))
            values.append(float(row[key]))
    return steps, values


def plot_demo(summary: dict, out: Path, path: Path) -> None:
    """Bars of held-out exact match before/after per stage, then one panel per stage's training curve;
    written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    bars = axes[0][0]
    stages = [s for s in EXACT_MATCH_STAGES if s in summary]
    before = [summary[s].get("heldout_exact_match_before") or 0.0 for s in stages]
    after = [summary[s].get("heldout_exact_match_after") or 0.0 for s in stages]
    xs = range(len(stages))
    bars.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="#bbbbbb")
    bars.bar([x + 0.2 for x in xs], after, width=0.4, label="after", color="#3b7dd8")
    for x, v in zip(xs, after):
        bars.text(x + 0.2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    bars.set_xticks(list(xs), [s.upper().replace("_LORA", "\nLoRA") for s in stages])
    bars.set_ylim(0, 1.05)
    bars.set_title("held-out exact match")
    bars.legend(loc="upper left", fontsize=8)
    for ax, (stage, (key, title)) in zip([a for row in axes for a in row][1:], STAGE_CURVES.items()):
        steps, values = read_curve(out / stage / "logging.jsonl", key)
        ax.plot(steps, values, marker=".", label=SECOND_CURVES[stage][0] if stage in SECOND_CURVES else None)
        if stage in SECOND_CURVES:
            first_label, second_label, log, second_key = SECOND_CURVES[stage]
            more_steps, more_values = read_curve(out / log / "logging.jsonl", second_key or key)
            if more_steps:
                ax.plot(more_steps, more_values, marker=".", label=second_label)
                ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("jaxalign demo: each stage from the SFT model")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
