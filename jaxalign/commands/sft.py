"""`jaxalign sft`: supervised fine-tuning on ms-swift-format conversations."""

from __future__ import annotations

import argparse

from jaxalign.config import add_flags, flags_from_namespace, load_config_file, resolve

NAME = "sft"
HELP = "supervised fine-tuning (ms-swift's `swift sft`)"


def register(sub) -> None:
    p = sub.add_parser(NAME, help=HELP, description=HELP)
    add_flags(p, "sft")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxalign.trainers.run import run_offline
    from jaxalign.trainers.sft import SFT

    file_cfg = load_config_file(args.config) if args.config else None
    cfg = resolve("sft", file_cfg, flags_from_namespace(args))
    trainer = run_offline(cfg, SFT())
    print(f"jaxalign: finished {trainer.total_steps} steps; outputs in {cfg.output_dir}")
    return 0
