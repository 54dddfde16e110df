"""`jaxalign plan`: compile a run's train step (and GRPO/PPO's sampler) for a topology, from shapes alone."""

from __future__ import annotations

import argparse
import json

from jaxalign.config import add_flags, flags_from_namespace, load_config_file, resolve

NAME = "plan"
HELP = "per-chip memory, FLOPs and a step-time bound of a run, compiled for a TPU slice (or cpu:N) without weights"
DESCRIPTION = (
    HELP + ". Takes the training command's flags (--rlhf_type sft|dpo|...|grpo|ppo, --model as a Hugging Face folder "
    "or its config.json, batch size, --max_length, --tuner_type, --torch_dtype, --mesh, ...) plus --topology. "
    "TPU names need libtpu: pip install \"jax[tpu]\" (no TPU attached). Exit 0: fits (or cpu: no HBM figure); "
    "1: does not fit; 2: a mistake in the command."
)


def register(sub) -> None:
    p = sub.add_parser(NAME, help=HELP, description=DESCRIPTION)
    p.add_argument("--topology", required=True,
                   help="a TPU slice (v5e:2x2, v5e:4x4, v5e:8x8, v5p:2x2x2, v5p:2x2x4, v6e:4x4, ...) or cpu:N")
    p.add_argument("--num_layers", type=int, default=None,
                   help="override the model's num_hidden_layers (a quick plan of a shallower model)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_flags(p, "rlhf")  # every training option; --rlhf_type also takes sft here
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxalign.errors import ConfigError
    from jaxalign.plan import topology

    topology.parse(args.topology)  # a malformed name is refused before anything loads
    if args.num_layers is not None and args.num_layers < 1:
        raise ConfigError(f"--num_layers {args.num_layers}: must be at least 1")
    topology.prepare_environment(args.topology)
    flags = flags_from_namespace(args)
    command = "rlhf"
    if flags.get("rlhf_type") == "sft":
        command = "sft"
        del flags["rlhf_type"]
    cfg = resolve(command, load_config_file(args.config) if args.config else None, flags)
    if not cfg.model:
        raise ConfigError("--model is required: a Hugging Face model folder or its config.json")

    from jaxalign.plan import build_plan, format_report, run_plan
    from jaxalign.plan.build import read_model_config

    read_model_config(cfg.model, num_layers=args.num_layers)  # a bad --model before libtpu loads
    topo = topology.load(args.topology)
    report = run_plan(build_plan(cfg, topo.devices, num_layers=args.num_layers), topo)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if report["fits"] is False else 0
