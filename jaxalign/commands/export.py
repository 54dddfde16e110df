"""`jaxalign export`: write a Hugging Face folder from a model folder or checkpoint."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a Hugging Face folder (safetensors, config, generation config, tokenizer)"


def register(sub) -> None:
    p = sub.add_parser(NAME, help=HELP, description=HELP)
    p.add_argument("--ckpt_dir", help="source: a jaxalign checkpoint folder (output_dir/checkpoint-N)")
    p.add_argument("--model", help="source: a Hugging Face model folder (with --adapters: the base, overriding the "
                                   "adapter config's base_model_name_or_path)")
    p.add_argument("--adapters", help="source: a LoRA adapter folder (PEFT format), merged into its base")
    p.add_argument("--merge_lora", default="false", help="write LoRA adapters merged into the base model (true/false; "
                                                         "default false; required true with --adapters)")
    p.add_argument("--output_dir", required=True, help="destination folder (must not already hold a model)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxalign.config import parse_bool
    from jaxalign.convert.export import export_adapters, export_checkpoint, export_hf_folder
    from jaxalign.errors import ConfigError

    merge = parse_bool(args.merge_lora, "merge_lora")
    if args.ckpt_dir and (args.model or args.adapters):
        raise ConfigError("--ckpt_dir: give one source: --ckpt_dir, --model, or --adapters (with --model as its base)")
    if not (args.ckpt_dir or args.model or args.adapters):
        raise ConfigError("export needs a source: --ckpt_dir, --model, or --adapters with --merge_lora true")
    if args.adapters:
        if not merge:
            raise ConfigError(f"--adapters {args.adapters}: pass --merge_lora true to write the merged model (the "
                              "adapter folder already is the PEFT export)")
        _, line = export_adapters(args.adapters, args.output_dir, model=args.model, max_shard_size=args.max_shard_size)
    elif args.ckpt_dir:
        _, line = export_checkpoint(args.ckpt_dir, args.output_dir, max_shard_size=args.max_shard_size,
                                    merge_lora=merge)
    else:
        _, line = export_hf_folder(args.model, args.output_dir, max_shard_size=args.max_shard_size)
    print(line)
    return 0
