"""GRPO on the demo task, jaxalign against TRL's GRPOTrainer: same SFT model, prompts, reward and settings.

Both sides start from one Hugging Face folder (by default the demo's SFT model, trained here with
`jaxalign demo`'s SFT stage: 1600 steps on 1-2 digit addition from its sloppy teacher) and train GRPO
with the demo's exact-match reward on the demo's prompt file: 8 prompts x --num_generations 8
completions per step, one optimizer step per generation, --max_completion_length 8, temperature 1.0,
beta 0.04, epsilon 0.2, --loss_type (default grpo; TRL's own default is dapo), scale_rewards group,
AdamW (jaxalign: ms-swift's betas 0.9/0.95; TRL: its 0.9/0.999), constant learning rate
--learning_rate, clipping at 1.0, gradient checkpointing on (both defaults), float32, CPU.

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

On a GPU (`bench/gpu.sh` runs this): --device cuda --dtype bfloat16 --shape qwen2.5-0.5b builds a random-weight
model of that shape with the demo's character vocabulary (so its embedding is 69 rows, not 151936) and trains both
sides in bfloat16 (jaxalign: bfloat16 compute over float32 masters; TRL: bf16 autocast).

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
    ap.add_argument("--shape", help="a named shape of bench/machine.py's SHAPES: time a random-weight model of it")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' compute dtype")
    ap.add_argument("--device", default="cpu", help="TRL's device, cpu or cuda (jax uses its default backend)")
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


def shape_model_folder(folder: Path, shape: str) -> tuple[Path, Path]:
    """A random-weight model of a named shape (bench/machine.py) with the demo's tokenizer and vocabulary, built with
    transformers, and the demo's prompts."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from machine import SHAPES

    from jaxalign.demo import build_char_tokenizer, make_prompt_rows

    tok = build_char_tokenizer()
    cls, kwargs = SHAPES[shape]
    cfg = getattr(transformers, cls)(**{**kwargs, "vocab_size": len(tok)}, max_position_embeddings=1024,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
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
        "learning_rate": args.learning_rate, "beta": 0.04, "loss_type": args.loss_type, "torch_dtype": args.dtype,
        # gradient checkpointing on, as jaxalign's and TRL's GRPOConfig's defaults have it (the demo's stages
        # turn it off for their tiny model)
        **stage_options(per_device_train_batch_size=8 * args.num_generations, logging_steps=1,
                        lr_scheduler_type="constant", warmup_ratio=0.0, gradient_checkpointing=True),
    })
    trainer = build_trainer(cfg, quiet=True)
    algo, clock = trainer.algo, SplitClock()
    clock.wrap(algo, "sample_group", "generation")
    clock.wrap(algo, "score", "scoring")
    clock.wrap(trainer, "step_on", "update")
    clock.wrap(algo, "run_step", "step", ends_step=True)
    last = {}
    real_step_on = trainer.step_on

    def keep_last(batches):
        last["micro"] = batches[0]
        return real_step_on(batches)

    trainer.step_on = keep_last
    history = trainer.train()
    rewards = [r["reward"] for r in history if "reward" in r]
    split = clock.per_step()
    # The update step computes the reference log-probs inside its compiled function (the old log-probs are the
    # sampler's, none computed): time that forward alone on the last micro-batch, as part of the update.
    split["ref_logps_in_update"] = ref_logps_seconds(trainer, last["micro"])
    return {"rewards": rewards, "s_per_step": split["step"], "first_step_s": clock.first_step, "split": split,
            "model": trainer.policy()}


class SplitClock:
    """Wall time per named part of a training step, summed over every step but the first (which compiles), by
    wrapping the methods that do each part on one object."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.first_step = None

    def wrap(self, obj, method: str, part: str, ends_step: bool = False):
        real = getattr(obj, method)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                took = time.perf_counter() - t
                if self.steps > 0:
                    self.totals[part] = self.totals.get(part, 0.0) + took
                if ends_step:
                    self.first_step = took if self.steps == 0 else self.first_step
                    self.steps += 1

        setattr(obj, method, timed)

    def step_ended(self):
        """For a caller whose step boundary is not a wrapped method."""
        self.steps += 1

    def per_step(self) -> dict[str, float]:
        n = max(self.steps - 1, 1)
        return {part: total / n for part, total in self.totals.items()}


def ref_logps_seconds(trainer, micro, repeats: int = 3) -> float:
    """Seconds of the reference model's completion log-probs alone on one micro-batch (compiled, best of
    ``repeats``): the share of jaxalign's update that TRL spends before its update."""
    import jax
    from flax import nnx

    from jaxalign.parallel.activations import mesh_context
    from jaxalign.trainers.grpo_step import completion_logps

    if trainer.algo.ref_params is None:
        return 0.0
    @jax.jit
    def ref_logps(params, micro):
        return completion_logps(nnx.merge(trainer.graphdef, params, trainer.rest), micro, trainer.cfg.temperature)[0]

    with mesh_context(trainer.mesh):
        jax.block_until_ready(ref_logps(trainer.algo.ref_params, micro))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(ref_logps(trainer.algo.ref_params, micro))
            best = min(best, time.perf_counter() - t)
    return best


def run_trl(args, model: Path, dataset: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from jaxalign.demo.synthetic import exact_match

    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)  # bf16: autocast over float32
    rows = [json.loads(line) for line in open(dataset)]
    data = Dataset.from_list([{"prompt": r["messages"], "solution": r["solution"]} for r in rows])

    def exact_match_reward(completions, solution, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if exact_match(t, s) else 0.0 for t, s in zip(texts, solution)]

    ends: list[float] = []
    clock = SplitClock()

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
            clock.step_ended()

    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=8 * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate, beta=0.04, loss_type=args.loss_type, temperature=1.0, max_steps=args.steps, logging_steps=1,
        report_to=[], use_cpu=args.device == "cpu", lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", seed=0,
        bf16=args.dtype == "bfloat16", dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[exact_match_reward], args=config, train_dataset=data,
                          processing_class=tok, callbacks=[StepTimes()])
    if not trainer.args.gradient_checkpointing:
        raise SystemExit("TRL's GRPOConfig no longer checkpoints gradients by default; the comparison would be unfair")
    # TRL's parts: generation, reward functions, and the old/reference log-probs it computes before the update
    # (calls of _get_per_token_logps_and_entropies inside _generate_and_score_completions); the rest of the
    # step is the update.
    clock.wrap(trainer, "_generate", "generation")
    clock.wrap(trainer, "_calculate_rewards", "scoring")
    clock.wrap(trainer, "_generate_and_score_completions", "prepare")
    real_logps = trainer._get_per_token_logps_and_entropies
    preparing = {"now": False}
    real_prepare = trainer._generate_and_score_completions

    def prepare(*a, **k):
        preparing["now"] = True
        try:
            return real_prepare(*a, **k)
        finally:
            preparing["now"] = False

    def logps(*a, **k):
        t = time.perf_counter()
        try:
            return real_logps(*a, **k)
        finally:
            if preparing["now"] and clock.steps > 0:
                clock.totals["old_ref_logps"] = clock.totals.get("old_ref_logps", 0.0) + time.perf_counter() - t

    trainer._generate_and_score_completions = prepare
    trainer._get_per_token_logps_and_entropies = logps
    t0 = time.perf_counter()
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else time.perf_counter() - t0
    split = clock.per_step()
    split["step"] = per_step
    split["update"] = per_step - split.get("prepare", 0.0)
    trainer.save_model(str(out / "final"))  # for the held-out evaluation, with jaxalign's evaluator
    return {"rewards": rewards, "s_per_step": per_step, "first_step_s": ends[0] - t0 if ends else None,
            "split": split, "model": out / "final"}


def heldout_exact_match(model, tokenizer_dir: Path, rows) -> float:
    """Greedy exact match on held-out rows, the demo's measure; ``model`` a Decoder or a Hugging Face folder."""
    from jaxalign.convert import load_hf_model
    from jaxalign.demo.evaluation import exact_match_accuracy
    from jaxalign.data.tokenizer import load_tokenizer

    if isinstance(model, Path):
        model = load_hf_model(model)
    return exact_match_accuracy(model, load_tokenizer(tokenizer_dir), rows, max_new_tokens=8)[0]


def print_split(results: dict) -> None:
    """Seconds per step by part, both sides (steps after the first)."""
    ja, tr = results["jaxalign"]["split"], results["TRL"]["split"]
    rows = [
        ("generation", ja.get("generation", 0.0), tr.get("generation", 0.0)),
        ("scoring (reward functions)", ja.get("scoring", 0.0), tr.get("scoring", 0.0)),
        ("old/ref log-probs before the update", 0.0, tr.get("old_ref_logps", 0.0)),
        ("update (jaxalign: with the ref log-probs)", ja.get("update", 0.0), tr.get("update", 0.0)),
        ("  of which ref log-probs (timed alone)", ja.get("ref_logps_in_update", 0.0), None),
    ]
    other = [ja["step"] - sum(r[1] for r in rows[:4]), tr["step"] - sum(r[2] for r in rows[:4])]
    rows += [("other (batching, advantages, logging)", *other), ("whole step", ja["step"], tr["step"])]
    print("\nseconds per step by part (after the first step):")
    print("| part | jaxalign | TRL |\n|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.3f} | {'-' if b is None else f'{b:.3f}'} |")
    print("(generation includes detokenising the completions on both sides)")


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
    if args.shape:
        model, dataset = shape_model_folder(work, args.shape)
    elif args.random_size:
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
    random = args.random_size or args.shape
    heldout = [json.loads(line) for line in open(heldout_file)] if heldout_file.is_file() and not random else None
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
    print_split(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
