"""Reliability: what a killed or interrupted run leaves is cleaned or reused at the next start, and the
bad inputs that used to crash or pass silently get one line naming the option, file or row.

The SIGTERM fault-injection run (kill mid-run, resume, compare with an uninterrupted run) is in
test_train_resume.py, beside the run it is compared with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from jaxalign.cli import main
from jaxalign.config import OPTIONS, RANGES, default_config, resolve
from jaxalign.data.loading import load_dataset_rows
from jaxalign.data.template import ChatRenderer
from jaxalign.errors import CheckpointError, ConfigError, DataError
from jaxalign.trainers.checkpoint import remove_interrupted_saves, resolve_resume
from jaxalign.trainers.logging import MetricsLogger
from jaxalign.trainers.preemption import PreemptionGuard
from jaxalign.trainers.run import check_output_dir
from helpers import TINY, cli_args, one_error_line, read_jsonl, short_rows, tiny_tokenizer, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


# ----- 1. SIGTERM / SIGINT --------------------------------------------------------------------------
def test_guard_catches_sigterm_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard(multi_host=False) as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this process; the guard only notes it
        assert guard.should_stop(2) and guard.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_second_ctrl_c_stops_at_once():
    with pytest.raises(KeyboardInterrupt):
        with PreemptionGuard(multi_host=False) as guard:
            os.kill(os.getpid(), signal.SIGINT)
            assert guard.should_stop(1) and guard.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)


def test_multi_host_stops_where_orbax_says_every_host_stops(monkeypatch):
    """On a pod the step comes from JAX's preemption sync (via orbax), the same on every host; the
    guard leaves the signal handlers to JAX's preemption notifier."""
    from orbax.checkpoint import multihost

    monkeypatch.setattr(multihost, "reached_preemption", lambda step: step == 3)
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(multi_host=True) as guard:
        assert signal.getsignal(signal.SIGTERM) is before
        assert [guard.should_stop(s) for s in (1, 2, 3)] == [False, False, True]
        assert guard.signum == signal.SIGTERM


# ----- 2. a killed save's temporary folder does not block the folder -------------------------------
def test_unfinished_checkpoint_save_does_not_block_a_rerun(tmp_path):
    out = tmp_path / "run"
    tmp = out / "checkpoint-4.orbax-checkpoint-tmp-1733"
    (tmp / "state").mkdir(parents=True)
    cfg = resolve("sft", None, {"output_dir": str(out)})
    check_output_dir(cfg)  # a fresh run may start: there is no checkpoint
    with pytest.raises(CheckpointError) as e:
        resolve_resume("latest", out)
    assert "no complete checkpoint-N folder" in str(e.value) and "without --resume_from_checkpoint" in str(e.value)
    assert remove_interrupted_saves(out) == [tmp] and not tmp.exists()


# ----- 3. a resumed log holds each step once, and the curves the whole run -------------------------
def test_resume_keeps_the_log_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "logging.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 7)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # killed mid-write
    logger = MetricsLogger(tmp_path, 10, initial_step=3)
    logger.log(4, {"loss": 1.5})
    logger.close(("loss",))
    assert [(r["step"], r["loss"]) for r in read_jsonl(log)] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 1.5)]
    assert [r["step"] for r in logger.history] == [1, 2, 3, 4]  # curves.png is drawn from these
    assert (tmp_path / "curves.png").exists()
    MetricsLogger(tmp_path, 10, initial_step=0).close()  # a fresh run starts an empty log
    assert log.read_text() == ""


def _tensorboard_scalars(folder) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from the event files under ``folder``, read as TFRecords (u64 length, u32 crc, the
    Event proto, u32 crc) with tensorboardX's Event message."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            scalars.update({(v.tag, event.step): v.simple_value for v in event.summary.value})
    return scalars


def test_report_to_tensorboard_writes_every_logged_scalar(tmp_path):
    logger = MetricsLogger(tmp_path, 2, report_to="tensorboard")
    logger.log(1, {"loss": 0.5, "learning_rate": 1e-5, "note": "text is not a scalar"})
    logger.log(2, {"loss": 0.25, "learning_rate": 5e-6})
    logger.close(("loss",))
    scalars = _tensorboard_scalars(tmp_path / "runs")
    assert scalars[("loss", 1)] == 0.5 and scalars[("loss", 2)] == 0.25
    assert scalars[("learning_rate", 1)] == pytest.approx(1e-5, rel=1e-7)  # float32 in the event
    assert {tag for tag, _ in scalars} == {"loss", "learning_rate", "elapsed_time"}


def test_report_to_tensorboard_without_a_writer_keeps_the_jsonl(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    logger = MetricsLogger(tmp_path, 1, report_to="tensorboard")
    logger.log(1, {"loss": 0.5})
    logger.close(("loss",))
    assert "pip install tensorboardX" in capsys.readouterr().out
    assert [r["loss"] for r in read_jsonl(tmp_path / "logging.jsonl")] == [0.5]
    assert not (tmp_path / "runs").exists()


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


# ----- 5. a non-UTF-8 byte is a bad row like any other -------------------------------------------------
def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}\n'.encode("latin-1")
                     + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError) as e:
        load_dataset_rows(str(path))
    assert str(e.value) == (f"{path} line 2: not UTF-8 (byte 0xe9 at byte 18); fix the line or pass "
                            "--ignore_bad_rows")
    rows = load_dataset_rows(str(path), ignore_bad_rows=True)
    assert [(r.line, r.error is None) for r in rows] == [(1, True), (2, False), (3, True)]


# ----- 6, 8. output folder and data mistakes, before any model loads -------------------------------------
def test_output_dir_that_is_a_file(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", short_rows(8))
    target = tmp_path / "taken"
    target.write_text("keep me")
    rc, err = run_cli(capsys, "sft", "--model", tiny_model_dir, "--dataset", data, "--output_dir", str(target),
                      *cli_args(TINY))
    assert rc == 2
    assert one_error_line(err) == f"jaxalign: error: --output_dir {target}: is a file, not a folder; choose another --output_dir"
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("case", ["empty", "too_long"])
def test_no_usable_rows_names_the_file_and_the_fix(case, tiny_model_dir, tmp_path, capsys):
    rows = [] if case == "empty" else short_rows(8)  # 26-30 tokens each, over --max_length 16
    data = write_jsonl(tmp_path / f"{case}.jsonl", rows)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "sft", "--model", tiny_model_dir, "--dataset", data, "--output_dir", str(out),
                      *cli_args({**TINY, "max_length": 16, "length_buckets": "16"}))
    line = one_error_line(err)
    assert rc == 2 and line.startswith(f"jaxalign: error: --dataset {data}: ")
    if case == "empty":
        assert line.endswith("holds no rows; add data")
    else:
        assert ("8 longer than --max_length 16, deleted" in line
                and line.endswith("raise --max_length or choose --truncation_strategy left or right"))
    assert not out.exists()


# ----- 10. the plain-template fallback is said once ----------------------------------------------------------
def test_missing_chat_template_is_noticed_once(capsys):
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.name_or_path = "no-template-tokenizer"
    capsys.readouterr()
    ChatRenderer(tok)
    ChatRenderer(tok)
    ChatRenderer(tok, "plain")  # chosen explicitly: no notice
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["jaxalign: note: no-template-tokenizer has no chat template; rendering conversations with "
                     "the plain template ('role: content' lines); pass --template plain to choose it explicitly"]


# ----- 11. a killed export's staging folder is removed at the next start ----------------------------------
def test_stale_export_staging_removed_at_next_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    stale = tmp_path / f".run.tmp-{dead.pid}"  # the final export of a run killed with -9
    stale_value = out / f".value_model.tmp-{dead.pid}"  # PPO's value model, beside the policy
    stale_adapter = out / f".adapter.tmp-{dead.pid}"  # LoRA's adapter files, staged inside the folder
    live = tmp_path / f".run.tmp-{os.getppid()}"  # an export still running in another process
    other = tmp_path / ".runner.tmp-1"  # another folder's
    for p in (stale, stale_value, stale_adapter, live, other):
        (p / "model.safetensors").parent.mkdir(parents=True)
        (p / "model.safetensors").write_bytes(b"partial")
    removed = remove_interrupted_saves(out)
    assert sorted(removed) == sorted([stale, stale_value, stale_adapter])
    assert not any(p.exists() for p in removed) and live.exists() and other.exists()
