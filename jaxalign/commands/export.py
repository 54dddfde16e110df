"""`jaxalign export`: write a Hugging Face folder from a model folder or checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    from jaxalign.convert import load_hf_model, save_hf_model
    from jaxalign.trainers.checkpoint_model import load_checkpoint_model

    if args.ckpt_dir:
        from jaxalign.trainers.checkpoint_model import is_reward_checkpoint

        src = Path(args.ckpt_dir)
        tokenizer = load_tokenizer_if_present(src.parent / "tokenizer")
        if is_reward_checkpoint(src):  # backbone + value_head.safetensors
            from jaxalign.convert.value_head_io import save_reward_model

            out = save_reward_model(load_checkpoint_model(src, value_head=True), args.output_dir, tokenizer=tokenizer)
            print(f"exported {src} -> {out} (with value_head.safetensors)")
            return 0
        model = load_checkpoint_model(src)
    else:
        src = Path(args.model)
        model = load_hf_model(src, dtype="float32")
        tokenizer = load_tokenizer_if_present(src)
    out = save_hf_model(model, args.output_dir, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    print(f"exported {src} -> {out}")
    return 0


def load_tokenizer_if_present(folder: str | Path):
    """The folder's tokenizer when it has one (tokenizer.json or tokenizer_config.json), else None."""
    if not any((Path(folder) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
