"""A Hugging Face model folder -> a jaxalign orbax checkpoint laid out for a mesh.

    python tools/convert_hf_to_jaxalign.py --model ./Qwen2.5-0.5B-Instruct --output_dir ckpt/qwen \
        --mesh data=1,fsdp=-1,tensor=1

writes ``ckpt/qwen/checkpoint-0`` (parameters, each saved with its sharding) and ``ckpt/qwen/tokenizer``.
Train from it with ``--model ckpt/qwen/checkpoint-0``: every host of a pod then restores its own slices
instead of reading the safetensors. ``tools/convert_jaxalign_to_hf.py`` turns it back.
"""

from __future__ import annotations

import sys

from jaxalign.cli import ArgumentParser, run_tool


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="convert_hf_to_jaxalign", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("--output_dir", required=True, help="folder to hold checkpoint-0/ and tokenizer/")
    parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="device mesh the arrays are laid out for")

    def convert(args) -> int:
        from jaxalign.convert.export import import_hf_folder
        from jaxalign.parallel import initialize_distributed
        from jaxalign.trainers.run import run_mesh

        initialize_distributed()
        ckpt = import_hf_folder(args.model, args.output_dir, mesh=run_mesh(args.mesh))
        print(f"converted {args.model} -> {ckpt}; train from it with --model {ckpt}")
        return 0

    return run_tool(parser, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
