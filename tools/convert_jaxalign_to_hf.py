"""A jaxalign checkpoint (``output_dir/checkpoint-N``) -> a Hugging Face folder, as ``jaxalign export`` does.

    python tools/convert_jaxalign_to_hf.py --ckpt_dir out/dpo/checkpoint-500 --output_dir out/dpo-hf

A reward-model checkpoint gives the backbone plus ``value_head.safetensors``.
"""

from __future__ import annotations

import sys

from jaxalign.cli import ArgumentParser, run_tool


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="convert_jaxalign_to_hf", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_dir", required=True, help="a jaxalign checkpoint folder (output_dir/checkpoint-N)")
    parser.add_argument("--output_dir", required=True, help="destination folder (must not already hold a model)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")

    def convert(args) -> int:
        from jaxalign.convert.export import export_checkpoint

        print(export_checkpoint(args.ckpt_dir, args.output_dir, max_shard_size=args.max_shard_size)[1])
        return 0

    return run_tool(parser, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
