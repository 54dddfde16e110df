"""The `jaxalign` command. Each subcommand lives in :mod:`jaxalign.commands`."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from jaxalign.errors import ConfigError, JaxalignError, Preempted

# Subcommand modules, in the order `jaxalign --help` lists them.
COMMANDS = ["demo", "sft", "rlhf", "infer", "export", "plan"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a one-line :class:`ConfigError` (no usage dump), and no
    abbreviations: the flags are ms-swift's exact names, so ``--learning_rat`` is a typo, not a prefix."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="jaxalign", description="Align language models with human preferences in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(f"jaxalign.commands.{name}").register(sub)
    parser.subcommands = sub.choices
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> ConfigError:
    """One line naming the unknown flags, a close known flag for each, and where the list is."""
    sub = parser.subcommands[command]
    known = [s for a in sub._actions for s in a.option_strings]
    hints = []
    for flag in extra:
        if flag.startswith("-"):
            hints += difflib.get_close_matches(flag.split("=", 1)[0], known, n=1)
    what = " ".join(extra) + (f" (did you mean {', '.join(hints)}?)" if hints else "")
    return ConfigError(f"unrecognized arguments: {what}; see `jaxalign {command} --help` for the valid flags")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _unknown_flags(parser, args.command, extra)
        return int(args.func(args) or 0)
    except JaxalignError as e:
        print(f"jaxalign: error: {e}", file=sys.stderr)
        return e.exit_code
    except Preempted as e:  # a checkpoint of the last step is saved; not an error of the user's
        print(f"jaxalign: {e}", file=sys.stderr)
        return e.exit_code


def run_tool(parser: ArgumentParser, fn, argv: list[str] | None = None) -> int:
    """A ``tools/`` script's main: parse, run ``fn(args)``, and turn a user mistake into one line and exit 2."""
    try:
        return int(fn(parser.parse_args(argv)) or 0)
    except JaxalignError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
