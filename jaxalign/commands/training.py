"""What `jaxalign sft` and `jaxalign rlhf` share: every option as a flag, then one training run."""

from __future__ import annotations

import argparse

from jaxalign.config import add_flags, flags_from_namespace, load_config_file, resolve


def register_training(sub, command: str, help_text: str) -> None:
    p = sub.add_parser(command, help=help_text, description=help_text)
    add_flags(p, command)
    p.set_defaults(func=lambda args: run_training(command, args))


def run_training(command: str, args: argparse.Namespace) -> int:
    from jaxalign.parallel.distributed import say
    from jaxalign.trainers.run import train

    cfg = resolve(command, load_config_file(args.config) if args.config else None, flags_from_namespace(args))
    trainer = train(cfg)
    what = f" of {cfg.rlhf_type}" if command == "rlhf" else ""
    say(f"jaxalign: finished {trainer.total_steps} steps{what}; outputs in {cfg.output_dir}")
    return 0
