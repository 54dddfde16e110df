"""Reliability: what a killed or interrupted run leaves is cleaned or reused at the next start, and the
bad inputs that used to crash or pass silently get one line naming the option, file or row.

The SIGTERM fault-injection run (kill mid-run, resume, compare with an uninterrupted run) is in
test_train_resume.py, beside the run it is compared with."""

from __future__ import annotations

import pytest

from jaxalign.cli import main
from jaxalign.config import OPTIONS, RANGES, default_config, resolve
from jaxalign.errors import ConfigError
from helpers import one_error_line

GOOD = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


# ----- 4. range checks -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command,flags,message",
    [
        ("sft", {"learning_rate": "-1"}, "--learning_rate -1.0: must be >= 0"),
        ("sft", {"warmup_ratio": "-0.1"}, "--warmup_ratio -0.1: must be in [0, 1]"),
        ("sft", {"weight_decay": "-0.01"}, "--weight_decay -0.01: must be >= 0"),
        ("sft", {"adam_beta1": "1"}, "--adam_beta1 1.0: must be in [0, 1)"),
        ("sft", {"adam_beta2": "1.5"}, "--adam_beta2 1.5: must be in [0, 1)"),
        ("sft", {"adam_epsilon": "-1e-8"}, "--adam_epsilon -1e-08: must be >= 0"),
        ("sft", {"max_grad_norm": "-1"}, "--max_grad_norm -1.0: must be >= 0"),
        ("sft", {"learning_rate": "nan"}, "--learning_rate nan: must be >= 0"),
        ("sft", {"save_total_limit": "0"}, "--save_total_limit 0: must be positive"),
        ("rlhf", {"beta": "-0.1"}, "--beta -0.1: must be >= 0"),
        ("rlhf", {"rlhf_type": "grpo", "epsilon": "-0.2"}, "--epsilon -0.2: must be >= 0"),
        ("rlhf", {"top_p": "0"}, "--top_p 0.0: must be in (0, 1]"),
        ("rlhf", {"label_smoothing": "0.5"}, "--label_smoothing 0.5: must be in [0, 0.5)"),
        ("rlhf", {"rlhf_type": "ppo", "lam": "1.5"}, "--lam 1.5: must be in [0, 1]"),
    ],
)
def test_out_of_range_values_refused(command, flags, message):
    with pytest.raises(ConfigError) as e:
        resolve(command, None, flags)
    assert str(e.value) == message


def test_ranges_name_options_and_hold_their_defaults():
    for name, allowed in RANGES.items():
        assert name in OPTIONS, name
        assert OPTIONS[name].type in (int, float), name
    for command in ("sft", "rlhf"):
        cfg = default_config(command)
        for name in RANGES:
            if cfg.get(name) is not None:
                assert cfg[name] in RANGES[name], (name, cfg[name])


def test_negative_learning_rate_refused_by_the_cli(capsys):
    rc, err = run_cli(capsys, "sft", "--model", "m", "--dataset", "d.jsonl", "--learning_rate", "-1")
    assert rc == 2 and one_error_line(err) == "jaxalign: error: --learning_rate -1.0: must be >= 0"


# ----- 9. no abbreviated flags -------------------------------------------------------------------------
@pytest.mark.parametrize("command,flag,full", [("sft", "--learning_rat", "--learning_rate"),
                                               ("rlhf", "--rlhf_typ", "--rlhf_type")])
def test_abbreviated_flag_refused(capsys, command, flag, full):
    rc, err = run_cli(capsys, command, "--model", "m", "--dataset", "d.jsonl", flag, "3e-3")
    line = one_error_line(err)
    assert rc == 2 and f"unrecognized arguments: {flag} 3e-3 (did you mean {full}?)" in line
