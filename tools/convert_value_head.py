"""A reward model between its two layouts: TRL's value head (a causal-LM folder plus
``value_head.safetensors``) and a ``*ForSequenceClassification`` folder (``score`` head, no bias).

    python tools/convert_value_head.py --input_dir out/rm --output_dir out/rm-seqcls      # -> seq_cls
    python tools/convert_value_head.py --input_dir Skywork-RM --output_dir rm-vhead       # -> value_head

The direction follows the input (``--to`` forces it). The value head's bias has no place in the
``score`` head: it is dropped, with a note giving its value (it shifts every score alike). A
sequence-classification folder has no LM head; the value-head folder ties it to the embeddings.
"""

from __future__ import annotations

import sys

from jaxalign.cli import ArgumentParser, run_tool


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="convert_value_head", description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True, help="a reward model folder in either layout")
    parser.add_argument("--output_dir", required=True, help="destination folder (must not already hold a model)")
    parser.add_argument("--to", choices=("auto", "seq_cls", "value_head"), default="auto",
                        help="target layout (default: the other one)")

    def convert(args) -> int:
        from jaxalign.convert.seq_cls import convert_reward_model

        for line in convert_reward_model(args.input_dir, args.output_dir, to=args.to):
            print(line)
        return 0

    return run_tool(parser, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
