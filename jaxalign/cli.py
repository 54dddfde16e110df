"""The `jaxalign` command. Each subcommand lives in :mod:`jaxalign.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxalign.errors import JaxalignError

# Subcommand modules, in the order `jaxalign --help` lists them.
COMMANDS = ["demo", "sft", "rlhf", "infer", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description="Align language models with human preferences in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(f"jaxalign.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except JaxalignError as e:
        print(f"jaxalign: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
