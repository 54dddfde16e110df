"""`jaxalign export`: write a Hugging Face folder from a model folder or checkpoint."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a Hugging Face folder (safetensors, config, generation config, tokenizer)"


def register(sub) -> None:
    p = sub.add_parser(NAME, help=HELP, description=HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_dir", help="source: a jaxalign checkpoint folder (output_dir/checkpoint-N)")
    src.add_argument("--model", help="source: a Hugging Face model folder")
    p.add_argument("--output_dir", required=True, help="destination folder (must not already hold a model)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxalign.convert.export import export_checkpoint, export_hf_folder

    if args.ckpt_dir:
        _, line = export_checkpoint(args.ckpt_dir, args.output_dir, max_shard_size=args.max_shard_size)
    else:
        _, line = export_hf_folder(args.model, args.output_dir, max_shard_size=args.max_shard_size)
    print(line)
    return 0
