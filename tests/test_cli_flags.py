"""Command-line flags as ms-swift users type them: list options space-separated, and every README command parsed."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from jaxalign.cli import build_parser
from jaxalign.config import OPTIONS, coerce, flags_from_namespace, resolve
from jaxalign.data.batching import parse_buckets
from jaxalign.data.loading import parse_spec
from jaxalign.losses.preference import preference_loss_types
from jaxalign.models.lora import parse_target_modules
from jaxalign.rewards.registry import split_names

README = Path(__file__).resolve().parent.parent / "README.md"


def _flags(argv: str) -> dict:
    args, extra = build_parser().parse_known_args(shlex.split(argv))
    assert extra == []
    return flags_from_namespace(args)


def test_list_options_take_space_separated_values_as_ms_swift():
    cfg = resolve("rlhf", None, _flags(
        "rlhf --rlhf_type dpo --model m --output_dir o --dataset a.jsonl b.parquet#500 --val_dataset v.jsonl "
        "--loss_type sigmoid bco_pair --loss_weights 0.8 0.2 --length_buckets 256 512 "
        "--tuner_type lora --target_modules q_proj v_proj"))
    assert parse_spec(cfg.dataset) == [("a.jsonl", None), ("b.parquet", 500)]
    assert parse_spec(cfg.val_dataset) == [("v.jsonl", None)]
    assert preference_loss_types("dpo", cfg.loss_type, cfg.loss_weights) == (("sigmoid", "bco_pair"), (0.8, 0.2))
    assert parse_buckets(cfg.length_buckets) == [256, 512]
    assert parse_target_modules(cfg.target_modules) == ("q_proj", "v_proj")

    grpo = resolve("rlhf", None, _flags(
        "rlhf --rlhf_type grpo --model m --output_dir o --dataset p.jsonl "
        "--reward_funcs accuracy format --reward_weights 1 0.5"))
    assert split_names(grpo.reward_funcs) == ["accuracy", "format"]
    assert [float(w) for w in split_names(grpo.reward_weights)] == [1.0, 0.5]


def test_list_options_keep_the_comma_form_and_take_lists_from_config_files():
    flags = _flags("rlhf --rlhf_type grpo --model m --output_dir o --dataset p.jsonl --reward_funcs accuracy,format")
    assert split_names(resolve("rlhf", None, flags).reward_funcs) == ["accuracy", "format"]
    from_file = resolve("rlhf", {"rlhf_type": "dpo", "model": "m", "dataset": ["a.jsonl", "b.jsonl"],
                                 "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5]}, {})
    assert parse_spec(from_file.dataset) == [("a.jsonl", None), ("b.jsonl", None)]
    assert preference_loss_types("dpo", from_file.loss_type, from_file.loss_weights) == (("sigmoid", "sft"), (1.0, 0.5))
    assert coerce("reward_funcs", ["none"]) is None


def test_single_value_options_still_refuse_a_second_value():
    args, extra = build_parser().parse_known_args(shlex.split("rlhf --model a b --output_dir o"))
    assert extra == ["b"]


def _readme_commands() -> list[str]:
    """The `jaxalign ...` lines of the README's code blocks, with continuation lines joined."""
    commands, current, in_block = [], "", False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block, current = not in_block, ""
            continue
        if not in_block:
            continue
        current += line.rstrip().rstrip("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        if "jaxalign" in shlex.split(current, comments=True):  # not a comment line that names it
            commands.append(current.strip())
        current = ""
    return commands


def test_readme_has_the_commands_this_test_reads():
    commands = _readme_commands()
    subcommands = {shlex.split(c, comments=True)[shlex.split(c, comments=True).index("jaxalign") + 1]
                   for c in commands}
    assert len(commands) >= 20 and {"demo", "sft", "rlhf", "infer", "export", "plan"} <= subcommands


@pytest.mark.parametrize("command", _readme_commands(), ids=lambda c: c[:60])
def test_readme_command_parses_with_valid_values(command):
    tokens = shlex.split(command, comments=True)
    argv = tokens[tokens.index("jaxalign") + 1:]
    args, extra = build_parser().parse_known_args(argv)
    assert extra == [], f"README command has flags jaxalign does not know: {extra}"
    if argv[0] in ("sft", "rlhf", "plan"):
        flags = flags_from_namespace(args)
        if argv[0] == "plan" and flags.get("rlhf_type") == "sft":  # plan's own extra choice
            del flags["rlhf_type"]
        for name, value in flags.items():
            assert name in OPTIONS
            coerce(name, value)  # types and choices, as a run checks them


@pytest.mark.parametrize("flag", ["--max_completion_length", "--max_new_tokens", "--response_length"])
def test_ms_swift_names_of_the_completion_budget(flag):
    cfg = resolve("rlhf", None, _flags(f"rlhf --rlhf_type ppo --model m --reward_model r --dataset p.jsonl {flag} 64"))
    assert cfg.max_completion_length == 64


@pytest.mark.parametrize("algorithm", ["cpo", "simpo", "orpo", "rm"])
def test_ref_adapters_refused_where_no_reference_is_used(algorithm):
    from jaxalign.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--ref_adapters: {algorithm} uses no reference model; drop the flag"):
        resolve("rlhf", None, {"rlhf_type": algorithm, "tuner_type": "lora", "ref_adapters": "sft_lora"})


@pytest.mark.parametrize("flags,message", [
    ({"rlhf_type": "grpo", "beta": "0", "ref_model": "ref"}, "--ref_model: grpo with --beta 0 uses no reference"),
    ({"rlhf_type": "grpo", "beta": "0", "tuner_type": "lora", "ref_adapters": "a"},
     "--ref_adapters: grpo with --beta 0 uses no reference"),
    ({"rlhf_type": "dpo", "reference_free": "true", "ref_model": "ref"},
     "--ref_model: --reference_free true uses no reference model; drop one of the two"),
])
def test_a_reference_the_run_would_not_load_is_refused(flags, message):
    from jaxalign.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{message}"):
        resolve("rlhf", None, flags)
    resolve("rlhf", None, {**flags, "beta": "0.04"} if "beta" in flags else {**flags, "reference_free": "false"})


def test_columns_option_as_ms_swift_takes_it():
    from jaxalign.data.formats import parse_columns
    from jaxalign.errors import ConfigError

    cfg = resolve("sft", None, _flags("""sft --model m --dataset d.jsonl --columns '{"question": "query", "answer": "response"}'"""))
    assert parse_columns(cfg.columns) == {"question": "query", "answer": "response"}
    import ml_collections

    from_file = resolve("sft", ml_collections.ConfigDict({"columns": {"question": "query"}}), {})  # as configs/*.py
    assert parse_columns(from_file.columns) == {"question": "query"}
    for bad, message in (("{question: query}", "not JSON"), ('["query"]', "must be a JSON object"),
                         ('{"question": 1}', "must be a JSON object")):
        with pytest.raises(ConfigError, match=f"^--columns .*{message}"):
            resolve("sft", None, {"columns": bad})
