"""`jaxalign demo`: the whole pipeline on an embedded tiny model and a checkable synthetic task.

No network and no files from outside: a character tokenizer and a tiny Llama are built here,
the task is multi-digit addition ("12+345=" -> "357") whose answers are checked exactly, and
each stage reports held-out exact-match accuracy before and after into ``summary.json``.

The SFT rows come from a sloppy teacher that forgets the units carry on 70% of the sums that have
one ("47+38=" -> "75"), as real demonstrations carry their author's systematic mistakes. SFT learns
the mistake; DPO (correct sum over a near miss) and GRPO (exact-match reward) see only correct
signals and are measured by how much of it they undo.

The teacher also ends 60% of its answers with a space ("85 "), which the answer check ignores and the
labelers of the reward-model pairs dislike (the bare answer over the same answer with the space). The
reward model learns that preference, which its head can read from the final token; PPO optimises it,
and is measured by the held-out reward-model score, the fraction of answers with the space, its KL
from the SFT model and held-out exact match (which the preference does not reward).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from jaxalign.config import resolve
from jaxalign.convert import load_hf_model, save_hf_model
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.demo.evaluation import (
    exact_match_accuracy,
    greedy_completions,
    render_prompts,
    sampled_completions,
    sampled_exact_match,
)
from jaxalign.demo.figure import plot_demo
from jaxalign.demo.synthetic import (
    carries,
    exact_match,
    forgot_carry,
    has_stray_space,
    make_addition_rows,
    make_preference_rows,
    make_prompt_rows,
    make_style_pairs,
)
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.demo.tiny_tokenizer import build_char_tokenizer
from jaxalign.errors import ConfigError
from jaxalign.rewards.model_reward import RewardModelReward
from jaxalign.trainers.run import build_trainer

DIGITS = (1, 2)
MAX_NEW_TOKENS = 8
TEACHER_CARRY_SLIP = 0.7  # the SFT teacher forgets the units carry on 70% of the sums that have one
TEACHER_STRAY_SPACE = 0.6  # and ends 60% of its answers with a space: above one half, so greedy SFT answers keep it
PROBE_PROMPTS = 200  # GRPO's expected reward is measured on this many of its training prompts
SAMPLES_PER_PROMPT = 4  # PPO's sampled held-out answers per prompt


# PPO against the demo's reward model (seed 0, 20 updates): at learning rate 1e-5 the policy does not move
# (approx-KL ~4e-6, no clipped token); at 1e-4 on the shared cosine schedule it stops moving half way (approx-KL
# under 5e-5 after update 12, sampled answers with the space 0.62 -> 0.51); at 3e-4, or 1e-4 held for 40 updates,
# it drifts 1.2-1.7 nats per answer from the SFT model and loses held-out exact match (0.48 -> 0.43, 0.31).
PPO_OPTIONS = {"per_device_train_batch_size": 32, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
               "num_ppo_epochs": 2, "kl_coef": 0.05, "num_sample_generations": 4, "missing_eos_penalty": 1.0}


def _write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def prepare_output_dir(out: Path) -> None:
    """A fresh folder; a previous demo's folder (it has demo.json) is replaced, anything else refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").exists():
            raise ConfigError(f"--output_dir {out}: exists and is not a jaxalign demo folder; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"created": time.time()}))


def carry_slips(rows, completions) -> float:
    """Of the held-out sums whose units column carries, the fraction answered with the carry forgotten."""

    said = [(r, c) for r, c in zip(rows, completions) if carries(r["messages"][0]["content"])]
    slips = [exact_match(c, forgot_carry(r["messages"][0]["content"])) for r, c in said]
    return sum(slips) / len(slips) if slips else 0.0


def stray_spaces(completions) -> float:
    """The fraction of completions that end with a space after the answer."""
    return sum(map(has_stray_space, completions)) / len(completions) if completions else 0.0


def build_base(out: Path, seed: int):
    """The embedded tokenizer and tiny random Llama, saved as a Hugging Face folder."""

    tok = build_char_tokenizer()
    cfg = llama_config(
        len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    model = random_model(cfg, seed=seed)
    save_hf_model(model, out / "base", tokenizer=tok)
    return model, tok


def stage_options(**overrides) -> dict[str, Any]:
    """Training options shared by the demo's stages (small model, short sequences, one compile)."""
    base = dict(
        max_length=64, length_buckets="32,64", per_device_train_batch_size=32, gradient_accumulation_steps=1,
        gradient_checkpointing=False, logging_steps=25, save_steps=100000, warmup_ratio=0.05,
        mesh="data=1,fsdp=1,tensor=1", lr_scheduler_type="cosine", weight_decay=0.0,
    )
    base.update(overrides)
    return base


def preference_stage(kind, out, train_file, heldout_file, heldout_rows, steps, seed, options, *, sft=None, name=None):
    """Train ``kind`` (dpo or rm) from the SFT model into ``out/name`` (default ``kind``); report held-out
    preference accuracy."""

    cfg = resolve("rlhf", None, {
        "rlhf_type": kind, "model": str(out / "sft"), "dataset": train_file, "val_dataset": heldout_file,
        "output_dir": str(out / (name or kind)), "max_steps": steps, "seed": seed,
        **stage_options(per_device_train_batch_size=16, eval_steps=max(steps // 2, 1), warmup_ratio=0.0, logging_steps=5),
        **options,
    })
    t0 = time.time()
    trainer = build_trainer(cfg, quiet=True)
    before = trainer.eval_metrics()
    trainer.train()
    trainer.export()
    evals = [r for r in trainer.history if any(k.startswith("eval_") for k in r)]
    key = "eval_rewards/accuracies" if kind != "rm" else "eval_accuracy"
    result = {
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "heldout_preference_accuracy_before": before.get(key),
        "heldout_preference_accuracy_after": evals[-1].get(key) if evals else None,
        "compilations": trainer.counter.count,
    }
    if kind == "dpo":
        acc, said = exact_match_accuracy(trainer.policy(), trainer.tokenizer, heldout_rows, max_new_tokens=MAX_NEW_TOKENS)
        result.update(heldout_exact_match_before=sft["heldout_exact_match_after"], heldout_exact_match_after=acc,
                      heldout_carry_slips_before=sft["heldout_carry_slips_after"],
                      heldout_carry_slips_after=carry_slips(heldout_rows, said))
    return result


def rm_scores(reward, tokenizer, rows, completions) -> float:
    """Mean score ``reward`` (a loaded :class:`RewardModelReward`) gives to (prompt, completion) pairs."""

    prompts = render_prompts(tokenizer, rows)
    end = tokenizer.eos_token_id
    comps = [tokenizer(c, add_special_tokens=False)["input_ids"] + [end] for c in completions]
    return float(sum(reward(completions, prompt_ids=prompts, completion_ids=comps)) / len(rows))


def sampled_rm_report(reward, model, tok, rows, temperature, seed, when) -> dict[str, float]:
    """Reward-model score and stray-space fraction of SAMPLES_PER_PROMPT sampled answers per held-out prompt at the
    training temperature: how the policy's distribution moved, where greedy answers flip only past one half."""
    texts = sampled_completions(model, tok, rows, max_new_tokens=MAX_NEW_TOKENS, temperature=temperature,
                                samples=SAMPLES_PER_PROMPT, seed=seed)
    repeated = [r for r in rows for _ in range(SAMPLES_PER_PROMPT)]
    return {f"heldout_sampled_rm_score_{when}": rm_scores(reward, tok, repeated, texts),
            f"heldout_sampled_stray_space_{when}": stray_spaces(texts)}


def ppo_movement(history) -> dict[str, float]:
    """How far PPO's updates moved the policy, from its logged rows: the mean and largest approx-KL and
    clip fraction of the updates, and the last rollout's KL from the reference (the SFT model)."""

    def column(key):
        return [r[key] for r in history if key in r]

    out = {}
    for key, name in (("policy/approxkl_avg", "approxkl"), ("policy/clipfrac_avg", "clipfrac")):
        values = column(key)
        if values:
            out[f"{name}_mean"], out[f"{name}_max"] = sum(values) / len(values), max(values)
    kl = column("objective/kl")
    if kl:
        out["rollout_kl_last"] = kl[-1]
    return out


def online_stage(kind, out, prompt_file, heldout_rows, steps, seed, *, sft, options=None):
    """GRPO (exact-match reward) or PPO (the demo's reward model) from the SFT model."""

    common = {
        "rlhf_type": kind, "model": str(out / "sft"), "dataset": prompt_file, "output_dir": str(out / kind),
        "max_steps": steps, "seed": seed, "max_completion_length": MAX_NEW_TOKENS, "temperature": 1.0,
        **stage_options(logging_steps=5, warmup_ratio=0.0),
    }
    if kind == "grpo":
        extra = {"reward_funcs": "exact_match", "num_generations": 8, "per_device_train_batch_size": 64,
                 "learning_rate": 1e-4, "beta": 0.04, "logging_steps": 10}
    else:
        extra = {"reward_model": str(out / "rm"), **PPO_OPTIONS}
    cfg = resolve("rlhf", None, {**common, **extra, **(options or {})})
    tok = load_tokenizer(out / "sft")
    result: dict[str, Any] = {"steps": steps}
    if kind == "ppo":
        _, reward = RewardModelReward.from_path(out / "rm", tok)
        sft_model = load_hf_model(out / "sft")
        before = greedy_completions(sft_model, tok, heldout_rows, max_new_tokens=MAX_NEW_TOKENS)
        result["heldout_rm_score_before"] = rm_scores(reward, tok, heldout_rows, before)
        result["heldout_stray_space_before"] = stray_spaces(before)
        result.update(sampled_rm_report(reward, sft_model, tok, heldout_rows, cfg.temperature, seed, "before"))
    t0 = time.time()
    trainer = build_trainer(cfg, quiet=True)
    if kind == "grpo":
        # The policy's expected reward on the first PROBE_PROMPTS training prompts (8 samples each at the
        # training temperature): the logged `reward` is noisier, each window drawing different prompts.
        with open(prompt_file) as f:
            probe = [json.loads(line) for _, line in zip(range(PROBE_PROMPTS), f)]

        def probe_reward():
            return sampled_exact_match(trainer.policy(), tok, probe, max_new_tokens=MAX_NEW_TOKENS, samples=8,
                                       temperature=cfg.temperature, seed=seed)

        result["train_prompts_sampled_reward_before"] = probe_reward()
    trainer.train()
    trainer.export()
    acc, completions = exact_match_accuracy(trainer.policy(), tok, heldout_rows, max_new_tokens=MAX_NEW_TOKENS)
    result.update(seconds=round(time.time() - t0, 1), heldout_exact_match_before=sft["heldout_exact_match_after"],
                  heldout_exact_match_after=acc, heldout_carry_slips_before=sft["heldout_carry_slips_after"],
                  heldout_carry_slips_after=carry_slips(heldout_rows, completions), compilations=trainer.counter.count)
    key = "reward" if kind == "grpo" else "objective/scores"
    curve = [r[key] for r in trainer.history if key in r]
    if curve:
        result[f"train_{key.replace('/', '_')}_first"] = curve[0]
        result[f"train_{key.replace('/', '_')}_last"] = curve[-1]
    if kind == "grpo":
        result["train_prompts_sampled_reward_after"] = probe_reward()
    if kind == "ppo":
        result["heldout_rm_score_after"] = rm_scores(reward, tok, heldout_rows, completions)
        result["heldout_rm_score_gain"] = result["heldout_rm_score_after"] - result["heldout_rm_score_before"]
        result["heldout_stray_space_after"] = stray_spaces(completions)
        result.update(sampled_rm_report(reward, trainer.policy(), tok, heldout_rows, cfg.temperature, seed, "after"))
        result.update(ppo_movement(trainer.history))
    return result


def sft_stage(out, train_file, heldout_file, heldout_rows, steps, seed, base_model, tok) -> dict[str, Any]:
    """SFT from the random base model into ``out/sft``; held-out exact match, slips and loss."""

    acc_before, _ = exact_match_accuracy(base_model, tok, heldout_rows, max_new_tokens=MAX_NEW_TOKENS)
    cfg = resolve("sft", None, {
        "model": str(out / "base"), "dataset": train_file, "val_dataset": heldout_file,
        "output_dir": str(out / "sft"), "max_steps": steps, "learning_rate": 3e-3, "seed": seed,
        **stage_options(eval_steps=max(steps // 4, 1)),
    })
    t0 = time.time()
    trainer = build_trainer(cfg, quiet=True)
    loss_before = trainer.eval_metrics().get("eval_loss")
    trainer.train()
    trainer.export()
    acc_after, samples = exact_match_accuracy(trainer.policy(), tok, heldout_rows, max_new_tokens=MAX_NEW_TOKENS)
    evals = [r for r in trainer.history if "eval_loss" in r]
    return {
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "heldout_exact_match_before": acc_before,
        "heldout_exact_match_after": acc_after,
        "heldout_carry_slips_after": carry_slips(heldout_rows, samples),
        "heldout_stray_space_after": stray_spaces(samples),
        "heldout_loss_before": loss_before,
        "heldout_loss_after": evals[-1]["eval_loss"] if evals else None,
        "compilations": trainer.counter.count,
        "samples": [
            {"prompt": r["messages"][0]["content"], "completion": s, "solution": r["solution"]}
            for r, s in list(zip(heldout_rows, samples))[:5]
        ],
    }


def run_demo(output_dir: str = "demo_output", *, sft_steps: int = 1600, dpo_steps: int = 100, rm_steps: int = 200,
             grpo_steps: int = 40, ppo_steps: int = 20, seed: int = 0, heldout: int = 200) -> dict:
    """Run every demo stage; return (and write) the summary."""

    out = Path(output_dir)
    prepare_output_dir(out)
    t_start = time.time()
    heldout_rows = make_addition_rows(heldout, seed=seed + 1, digits=DIGITS)
    exclude = [r["messages"][0]["content"] for r in heldout_rows]
    train_rows = make_addition_rows(4000, seed=seed, digits=DIGITS, exclude=exclude, carry_slip=TEACHER_CARRY_SLIP,
                                    stray_space=TEACHER_STRAY_SPACE)
    data = out / "data"
    train_file = _write_jsonl(data / "sft_train.jsonl", train_rows)
    heldout_file = _write_jsonl(data / "heldout.jsonl", heldout_rows)
    base_model, tok = build_base(out, seed)
    slipped = sum(r["messages"][-1]["content"].rstrip() != r["solution"] for r in train_rows)
    spaced = sum(has_stray_space(r["messages"][-1]["content"]) for r in train_rows)
    summary: dict[str, Any] = {
        "task": f"addition of {DIGITS[0]}-{DIGITS[1]} digit numbers", "heldout_rows": heldout,
        "sft_teacher": {"carry_slip": TEACHER_CARRY_SLIP, "stray_space": TEACHER_STRAY_SPACE, "rows": len(train_rows),
                        "rows_with_carry_forgotten": slipped, "rows_with_stray_space": spaced},
    }

    # Stage 1: SFT
    print(f"jaxalign demo: SFT for {sft_steps} steps on {len(train_rows)} rows ({slipped} with the carry forgotten)")
    summary["sft"] = sft_stage(out, train_file, heldout_file, heldout_rows, sft_steps, seed, base_model, tok)

    # Stage 2: DPO from the SFT model on (correct, near-miss) pairs
    pair_rows = make_preference_rows(2000, seed=seed + 2, digits=DIGITS, exclude=exclude)
    pair_heldout = make_preference_rows(heldout, seed=seed + 1, digits=DIGITS)
    pair_file = _write_jsonl(data / "pairs_train.jsonl", pair_rows)
    pair_heldout_file = _write_jsonl(data / "pairs_heldout.jsonl", pair_heldout)
    print(f"jaxalign demo: DPO for {dpo_steps} steps on {len(pair_rows)} pairs")
    summary["dpo"] = preference_stage(
        "dpo", out, pair_file, pair_heldout_file, heldout_rows, dpo_steps, seed,
        {"beta": 0.1, "learning_rate": 2e-4, "rpo_alpha": 1.0}, sft=summary["sft"],
    )

    # Stage 2b: the same DPO with LoRA adapters (reference = the SFT model with the adapters off)
    print(f"jaxalign demo: DPO with LoRA adapters for {dpo_steps} steps on the same pairs")
    summary["dpo_lora"] = preference_stage(
        "dpo", out, pair_file, pair_heldout_file, heldout_rows, dpo_steps, seed,
        {"beta": 0.1, "learning_rate": 2e-3, "rpo_alpha": 1.0, "tuner_type": "lora"}, sft=summary["sft"],
        name="dpo_lora",
    )

    # Stage 3: a reward model on the labelers' pairs: the bare answer over the same answer with a stray space
    style_file = _write_jsonl(data / "rm_pairs_train.jsonl", make_style_pairs(2000, seed=seed + 4, digits=DIGITS,
                                                                               exclude=exclude))
    style_heldout_file = _write_jsonl(data / "rm_pairs_heldout.jsonl",
                                      make_style_pairs(heldout, seed=seed + 1, digits=DIGITS))
    print(f"jaxalign demo: reward model for {rm_steps} steps on pairs without/with a stray space")
    summary["rm"] = preference_stage(
        "rm", out, style_file, style_heldout_file, heldout_rows, rm_steps, seed, {"learning_rate": 2e-3},
    )

    # Stages 4 and 5: online RL from the SFT model
    prompt_rows = make_prompt_rows(2000, seed=seed + 3, digits=DIGITS, exclude=exclude)
    prompt_file = _write_jsonl(data / "prompts_train.jsonl", prompt_rows)
    print(f"jaxalign demo: GRPO for {grpo_steps} steps with the exact-match reward")
    summary["grpo"] = online_stage("grpo", out, prompt_file, heldout_rows, grpo_steps, seed, sft=summary["sft"])
    print(f"jaxalign demo: PPO for {ppo_steps} updates with the demo's reward model")
    summary["ppo"] = online_stage("ppo", out, prompt_file, heldout_rows, ppo_steps, seed, sft=summary["sft"])
    summary["seconds_total"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_demo(summary, out, out / "curves.png")
    return summary
