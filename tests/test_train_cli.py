"""User mistakes through `jaxalign sft|rlhf`: each exits 2 with one line on stderr naming the
file and line or the option; a diverging run stops naming the step and saves nothing for it."""

from __future__ import annotations

import json
import math

import pytest

from jaxalign.cli import main
from helpers import TINY, cli_args, make_base, one_error_line, read_jsonl, short_rows, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("cli_base") / "base", seed=4)


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("cli_data") / "good.jsonl", short_rows(16, seed=5))


def sft(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["sft", *args])
    return rc, capsys.readouterr().err


# Bad rows: each on line 3 of its file, after two good rows.
BAD_ROWS = {
    "bad_json": ('{"messages": [{"role": "user", "content": "1+1="}', "bad JSON"),
    "missing_messages": ({"dialogue": [{"role": "user", "content": "1+1="}]}, 'missing "messages"'),
    "role_out_of_place": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
        "system message is only allowed first",
    ),
    "assistant_first": (
        {"messages": [{"role": "assistant", "content": "2"}, {"role": "user", "content": "1+1="}]},
        "starts with an assistant message",
    ),
    "empty_response": (
        {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": ""}]},
        "empty assistant response",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_and_line(case, base, tmp_path, capsys):
    bad, what = BAD_ROWS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [GOOD, GOOD, bad, GOOD])
    rc, err = sft(capsys, "--model", base, "--dataset", path, "--output_dir", str(tmp_path / "out"), *cli_args(TINY))
    line = one_error_line(err)
    assert rc == 2
    assert f"{case}.jsonl line 3" in line and what in line and "--ignore_bad_rows" in line
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_non_boolean_label_names_file_and_line(base, tmp_path, capsys):
    rows = [{**GOOD, "label": True}, {**GOOD, "label": False}, {**GOOD, "label": "yes"}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    capsys.readouterr()
    rc = main(["rlhf", "--rlhf_type", "kto", "--model", base, "--dataset", path, "--output_dir", str(tmp_path / "o"),
               *cli_args(TINY)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "kto.jsonl line 3" in line and '"label" must be true or false' in line and "'yes'" in line


def test_ignore_bad_rows_counts_and_skips(base, good_data, tmp_path, capsys):
    rows = read_jsonl(good_data)
    path = write_jsonl(tmp_path / "mixed.jsonl", rows[:8] + ['{"messages": ', BAD_ROWS["empty_response"][0]] + rows[8:])
    capsys.readouterr()
    rc = main(["sft", "--model", base, "--dataset", path, "--output_dir", str(tmp_path / "o"), "--ignore_bad_rows", "true",
               "--max_steps", "1", "--save_hf", "false", *cli_args(TINY)])
    out = capsys.readouterr().out
    assert rc == 0
    stats = json.loads(next(line for line in out.splitlines() if line.startswith("jaxalign: data "))[len("jaxalign: data "):])
    assert stats["bad_rows"] == 2 and stats["train"] == 16


def test_unknown_flag(capsys):
    rc, err = sft(capsys, "--model", "m", "--lerning_rate", "1e-4")
    line = one_error_line(err)
    assert rc == 2
    assert "--lerning_rate" in line and "did you mean --learning_rate?" in line and "jaxalign sft --help" in line


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("lr_scheduler_type", "foo", "--lr_scheduler_type 'foo': not one of cosine, linear, constant"),
        ("torch_dtype", "float16", "--torch_dtype 'float16': not one of float32, bfloat16"),
        ("max_steps", "ten", "--max_steps 'ten': expected int"),
        ("gradient_checkpointing", "maybe", "--gradient_checkpointing 'maybe': expected true or false"),
        ("warmup_ratio", "1.5", "--warmup_ratio 1.5: must be in [0, 1]"),
    ],
)
def test_invalid_value(flag, value, expected, capsys):
    rc, err = sft(capsys, "--model", "m", "--dataset", "d.jsonl", f"--{flag}", value)
    assert rc == 2 and one_error_line(err) == f"jaxalign: error: {expected}"


def test_invalid_rlhf_type(capsys):
    capsys.readouterr()
    rc = main(["rlhf", "--rlhf_type", "ppo_typo", "--model", "m", "--dataset", "d.jsonl"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--rlhf_type 'ppo_typo': not one of dpo" in line


def test_missing_model_and_dataset(good_data, base, tmp_path, capsys):
    rc, err = sft(capsys, "--dataset", good_data, "--output_dir", str(tmp_path / "o"))
    assert rc == 2 and "--model is required" in one_error_line(err)
    rc, err = sft(capsys, "--model", base, "--output_dir", str(tmp_path / "o"))
    assert rc == 2 and "--dataset is required" in one_error_line(err)


def test_missing_dataset_file(base, tmp_path, capsys):
    rc, err = sft(capsys, "--model", base, "--dataset", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "o"),
                  *cli_args(TINY))
    assert rc == 2 and "nope.jsonl" in one_error_line(err)


def test_output_dir_with_checkpoints_needs_resume(base, good_data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-5" / "meta").mkdir(parents=True)
    (out / "args.json").write_text("{}")
    rc, err = sft(capsys, "--model", base, "--dataset", good_data, "--output_dir", str(out), *cli_args(TINY))
    line = one_error_line(err)
    assert rc == 2 and f"--output_dir {out}" in line and "--resume_from_checkpoint latest" in line
    # and resuming from "latest" where there is no finished checkpoint is refused too
    empty = tmp_path / "empty"
    rc, err = sft(capsys, "--model", base, "--dataset", good_data, "--output_dir", str(empty),
                  "--resume_from_checkpoint", "latest", *cli_args(TINY))
    assert rc == 2 and "--resume_from_checkpoint latest: no complete checkpoint-N folder" in one_error_line(err)
    assert not empty.exists()  # refused before anything was written


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.py"
    cfg.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'learning_rat': 1e-4})\n")
    rc, err = sft(capsys, "--config", str(cfg), "--model", "m", "--dataset", "d.jsonl")
    assert rc == 2 and "config file: unknown option 'learning_rat'" in one_error_line(err)
    rc, err = sft(capsys, "--config", str(tmp_path / "missing.py"))
    assert rc == 2 and "missing.py: no such file" in one_error_line(err)


def test_nan_stops_naming_the_step_without_checkpoint(base, good_data, tmp_path, capsys):
    """lr 1e30: step 1 is fine, its update blows the weights up, step 2's gradients are NaN."""
    out = tmp_path / "nan"
    capsys.readouterr()
    rc = main(["sft", "--model", base, "--dataset", good_data, "--output_dir", str(out),
               *cli_args({**TINY, "learning_rate": 1e30, "max_steps": 4, "save_steps": 1})])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if "jaxalign: error:" in line]
    assert len(errors) == 1 and "\n" not in errors[0]
    line = errors[0][errors[0].index("jaxalign: error:"):]
    assert line.startswith("jaxalign: error: step 2: ") and "nan" in line and "checkpoint-1" in line
    assert "--learning_rate" in line
    assert (out / "checkpoint-1" / "meta").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()  # no export of a diverged model
    logged = read_jsonl(out / "logging.jsonl")
    assert [r["step"] for r in logged] == [1] and math.isfinite(logged[0]["loss"])
