"""`jaxalign demo`: the embedded end-to-end run (tiny model, synthetic task, no network)."""

from __future__ import annotations

import argparse
import json

NAME = "demo"
HELP = "run the whole pipeline on an embedded tiny model and task (a few minutes on a CPU)"


def register(sub) -> None:
    p = sub.add_parser(NAME, help=HELP, description=HELP)
    p.add_argument("--output_dir", default="demo_output", help="where the demo writes (default demo_output)")
    p.add_argument("--sft_steps", type=int, default=1600, help="SFT steps (default 1600)")
    p.add_argument("--dpo_steps", type=int, default=100, help="DPO steps (default 100)")
    p.add_argument("--rm_steps", type=int, default=200, help="reward-model steps (default 200)")
    p.add_argument("--grpo_steps", type=int, default=40, help="GRPO steps (default 40)")
    p.add_argument("--ppo_steps", type=int, default=20, help="PPO updates (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and weights (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxalign.demo import run_demo

    summary = run_demo(
        args.output_dir, sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, rm_steps=args.rm_steps,
        grpo_steps=args.grpo_steps, ppo_steps=args.ppo_steps, seed=args.seed,
    )
    short = {k: ({kk: vv for kk, vv in v.items() if kk != "samples"} if isinstance(v, dict) else v) for k, v in summary.items()}
    print(json.dumps(short, indent=2))
    print(f"jaxalign demo: summary in {args.output_dir}/summary.json, curves in {args.output_dir}/curves.png")
    return 0
