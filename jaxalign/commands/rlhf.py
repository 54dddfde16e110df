"""`jaxalign rlhf --rlhf_type ...`: preference and reward-model training (ms-swift's `swift rlhf`)."""

from __future__ import annotations

import argparse

from jaxalign.config import add_flags, flags_from_namespace, load_config_file, resolve
from jaxalign.errors import ConfigError

NAME = "rlhf"
HELP = "preference alignment: --rlhf_type dpo|cpo|simpo|orpo|kto|rm"


def register(sub) -> None:
    p = sub.add_parser(NAME, help=HELP, description=HELP)
    add_flags(p, "rlhf")
    p.set_defaults(func=run)


def build_algorithm(cfg):
    """The algorithm object for ``cfg.rlhf_type`` (reference params are set up by the trainer)."""
    from jaxalign.trainers.preference import PAIR_TYPES, PairPreference

    if cfg.rlhf_type in PAIR_TYPES:
        return PairPreference(cfg)
    if cfg.rlhf_type == "kto":
        from jaxalign.trainers.kto import KTO

        return KTO(cfg)
    if cfg.rlhf_type == "rm":
        from jaxalign.trainers.reward import RewardModelling

        return RewardModelling(cfg)
    choices = ", ".join((*PAIR_TYPES, "kto", "rm"))
    raise ConfigError(f"--rlhf_type {cfg.rlhf_type}: not available in this build; choose one of {choices}")


def run(args: argparse.Namespace) -> int:
    from jaxalign.trainers.run import run_offline

    file_cfg = load_config_file(args.config) if args.config else None
    cfg = resolve("rlhf", file_cfg, flags_from_namespace(args))
    if cfg.ref_model and cfg.rlhf_type in ("cpo", "simpo", "orpo", "rm"):
        raise ConfigError(f"--ref_model: {cfg.rlhf_type} uses no reference model; drop the flag")
    if cfg.rlhf_type == "grpo":
        from jaxalign.trainers.run import build_grpo_trainer, finish

        trainer = build_grpo_trainer(cfg)
        trainer.history = trainer.train()
        finish(trainer)
    elif cfg.rlhf_type == "ppo":
        from jaxalign.trainers.run import build_ppo_trainer

        trainer = build_ppo_trainer(cfg)
        trainer.history = trainer.train()
        if cfg.save_hf:
            trainer.export()
    else:
        trainer = run_offline(cfg, build_algorithm(cfg))
    print(f"jaxalign: finished {trainer.total_steps} steps of {cfg.rlhf_type}; outputs in {cfg.output_dir}")
    return 0
