"""GRPO on the demo task, jaxalign against TRL's GRPOTrainer: same SFT model, prompts, reward and settings.

Both sides start from one Hugging Face folder (by default the demo's SFT model, trained here with
`jaxalign demo`'s SFT stage: 1600 steps on 1-2 digit addition from its sloppy teacher) and train GRPO
with the demo's exact-match reward on the demo's prompt file: 8 prompts x --num_generations 8
completions per step, one optimizer step per generation, --max_completion_length 8, temperature 1.0,
beta 0.04, epsilon 0.2, --loss_type (default grpo; TRL's own default is dapo), scale_rewards group,
AdamW (jaxalign: ms-swift's betas 0.9/0.95; TRL: its 0.9/0.999), constant learning rate
--learning_rate, clipping at 1.0, float32, CPU.

Printed: the mean training reward (sampled, temperature 1) over each window of --window steps for
both sides; held-out greedy exact match of the start model and of both trained models (jaxalign's
evaluator on --heldout rows, by default the demo's heldout.jsonl beside the prompt file); and each
side's seconds per step after its first step (generation + scoring + update; jaxalign's first step
includes compilation). The reward curves are two independent sampling processes, so they agree only
up to sampling noise; a systematic gap would point at a difference in the algorithm.

Needs TRL, which is not a jaxalign dependency:  pip install trl

Speed at a larger size: --random_size 512,8 builds a random-weight Llama instead (hidden 512, 8 layers,
8/4 heads, MLP 1376, the demo's character vocabulary, untied head; ~23M parameters) and uses the demo's
prompts. Its rewards are all 0, so only the seconds per step mean anything; every completion runs to
--max_completion_length on both sides, since a random model seldom emits EOS.

Run by hand:  python bench/bench_grpo.py [--steps 100] [--learning_rate 2e-4] [--model SFT_DIR --dataset prompts.jsonl]
              python bench/bench_grpo.py --random_size 512,8 --steps 10 --max_completion_length 64
Check the script quickly (SFT 60 steps, 6 GRPO steps):  python bench/bench_grpo.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an SFT Hugging Face folder (default: train the demo's SFT model here)")
    ap.add_argument("--dataset", help="prompt rows with a `solution` column (default: the demo's prompts)")
    ap.add_argument("--random_size", help="hidden,layers: time a random-weight Llama of this size instead")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--learning_rate", type=float, default=2e-4)
    ap.add_argument("--num_generations", type=int, default=8)
    ap.add_argument("--max_completion_length", type=int, default=8)
    ap.add_argument("--loss_type", default="grpo", help="both sides (TRL's own default is dapo)")
    ap.add_argument("--heldout", help="rows with a `solution` column: greedy exact match of both sides' models "
                    "before and after (default: heldout.jsonl beside --dataset, if there)")
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script")
    ap.add_argument("--json", help="write the figures here")
    return ap.parse_args(argv)


def demo_sft(folder: Path, sft_steps: int | None) -> tuple[Path, Path]:
    """The demo's SFT model and prompt file (the demo's SFT stage, its default length unless given;
    the other stages for one step)."""
    from jaxalign.demo import run_demo

    steps = {} if sft_steps is None else {"sft_steps": sft_steps}
    run_demo(str(folder), dpo_steps=1, rm_steps=1, grpo_steps=1, ppo_steps=1, **steps)
    return folder / "sft", folder / "data" / "prompts_train.jsonl"


def random_model_folder(folder: Path, size: str) -> tuple[Path, Path]:
    """A random-weight Llama of ``hidden,layers`` with the demo's tokenizer, and the demo's prompts."""
    from jaxalign.convert import save_hf_model
    from jaxalign.demo import build_char_tokenizer, make_prompt_rows
    from jaxalign.demo.tiny_model import llama_config, random_model

    hidden, layers = (int(v) for v in size.split(","))
    tok = build_char_tokenizer()
    cfg = llama_config(len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=int(hidden * 2.6875), max_position_embeddings=256,
                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    save_hf_model(random_model(cfg, seed=0), folder / "model", tokenizer=tok)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in make_prompt_rows(2000, seed=3, digits=(1, 2))))
    return folder / "model", prompts


def windows(values: list[float], size: int) -> list[float]:
    return [float(np.mean(values[i : i + size])) for i in range(0, len(values), size)]


def run_jaxalign(args, model: Path, dataset: Path, out: Path) -> dict:
    from jaxalign.config import resolve
    from jaxalign.demo import stage_options
    from jaxalign.trainers.run import build_trainer

    cfg = resolve("rlhf", None, {
        "rlhf_type": "grpo", "model": str(model), "dataset": str(dataset), "output_dir": str(out),
        "max_steps": args.steps, "seed": 0, "max_completion_length": args.max_completion_length,
        "temperature": 1.0, "reward_funcs": "exact_match", "num_generations": args.num_generations,
        "learning_rate": args.learning_rate, "beta": 0.04, "loss_type": args.loss_type,
        **stage_options(per_device_train_batch_size=8 * args.num_generations, logging_steps=1,
                        lr_scheduler_type="constant", warmup_ratio=0.0),
    })
    trainer = build_trainer(cfg, quiet=True)
    starts = []
    real_step = trainer.train_step

    def timed_step(batch):
        starts.append(time.perf_counter())
        return real_step(batch)

    trainer.train_step = timed_step
    t0 = time.perf_counter()
    history = trainer.train()
    total = time.perf_counter() - t0
    rewards = [r["reward"] for r in history if "reward" in r]
    # whole cycles (generation, scoring, update) from the second step's update to the last one's:
    # the first update compiles, and the run ends with a checkpoint write
    per_step = (starts[-1] - starts[1]) / (len(starts) - 2) if len(starts) > 2 else total
    return {"rewards": rewards, "s_per_step": per_step, "first_step_s": (starts[1] - t0) if len(starts) > 1 else total,
            "model": trainer.policy()}


def run_trl(args, model: Path, dataset: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from jaxalign.demo.synthetic import exact_match

    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    rows = [json.loads(line) for line in open(dataset)]
    data = Dataset.from_list([{"prompt": r["messages"], "solution": r["solution"]} for r in rows])

    def exact_match_reward(completions, solution, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if exact_match(t, s) else 0.0 for t, s in zip(texts, solution)]

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=8 * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate, beta=0.04, loss_type=args.loss_type, temperature=1.0, max_steps=args.steps, logging_steps=1,
        report_to=[], use_cpu=True, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", seed=0,
        bf16=False, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[exact_match_reward], args=config, train_dataset=data,
                          processing_class=tok, callbacks=[StepTimes()])
    t0 = time.perf_counter()
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else time.perf_counter() - t0
    trainer.save_model(str(out / "final"))  # for the held-out evaluation, with jaxalign's evaluator
    return {"rewards": rewards, "s_per_step": per_step, "first_step_s": ends[0] - t0 if ends else None,
            "model": out / "final"}


def heldout_exact_match(model, tokenizer_dir: Path, rows) -> float:
    """Greedy exact match on held-out rows, the demo's measure; ``model`` a Decoder or a Hugging Face folder."""
    from jaxalign.convert import load_hf_model
    from jaxalign.demo.evaluation import exact_match_accuracy
    from jaxalign.data.tokenizer import load_tokenizer

    if isinstance(model, Path):
        model = load_hf_model(model)
    return exact_match_accuracy(model, load_tokenizer(tokenizer_dir), rows, max_new_tokens=8)[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.window = 6, 3
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        print("bench_grpo: TRL is not installed (pip install trl)", file=sys.stderr)
        return 2
    if args.heldout and not Path(args.heldout).is_file():
        print(f"bench_grpo: --heldout {args.heldout}: no such file; give rows with a solution column", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    if args.random_size:
        model, dataset = random_model_folder(work, args.random_size)
    elif args.model:
        model, dataset = Path(args.model), Path(args.dataset or "")
        if not dataset.is_file():
            print("bench_grpo: --model needs --dataset (prompt rows with a solution column)", file=sys.stderr)
            return 2
    else:
        print("bench_grpo: training the demo's SFT model", flush=True)
        model, dataset = demo_sft(work / "demo", 60 if args.quick else None)
    heldout_file = Path(args.heldout) if args.heldout else dataset.parent / "heldout.jsonl"
    heldout = [json.loads(line) for line in open(heldout_file)] if heldout_file.is_file() and not args.random_size else None
    results = {}
    for side, fn in (("jaxalign", run_jaxalign), ("TRL", run_trl)):
        print(f"bench_grpo: {side}, {args.steps} steps", flush=True)
        results[side] = fn(args, model, dataset, work / side)
        trained = results[side].pop("model")
        if heldout:
            results[side]["heldout_exact_match"] = heldout_exact_match(trained, model, heldout)
    print(f"\nGRPO, {args.steps} steps, lr {args.learning_rate}, {args.num_generations} generations x 8 prompts per step")
    print("mean training reward per window of", args.window, "steps:")
    print("| steps | jaxalign | TRL |\n|---|---|---|")
    ja, tr = windows(results["jaxalign"]["rewards"], args.window), windows(results["TRL"]["rewards"], args.window)
    for i, (a, b) in enumerate(zip(ja, tr)):
        print(f"| {i * args.window + 1}-{min((i + 1) * args.window, args.steps)} | {a:.3f} | {b:.3f} |")
    if heldout:
        print(f"held-out greedy exact match ({len(heldout)} rows): start {heldout_exact_match(model, model, heldout):.3f}, "
              f"after jaxalign {results['jaxalign']['heldout_exact_match']:.3f}, after TRL {results['TRL']['heldout_exact_match']:.3f}")
    sj, st = results["jaxalign"]["s_per_step"], results["TRL"]["s_per_step"]
    print(f"s/step after the first: jaxalign {sj:.3f}, TRL {st:.3f}; jaxalign / TRL speed {st / sj:.2f}x "
          f"(jaxalign first step incl. compile {results['jaxalign']['first_step_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
