"""One `jaxalign sft --config configs/tiny_cpu.py` run end to end: the options it ran with, its
metrics log and curves, its compilations, checkpoints, and the Hugging Face folders it exports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxalign.cli import main
from jaxalign.data import BatchIterator, make_buckets, prepare_data
from jaxalign.demo import build_char_tokenizer
from helpers import CONFIGS, cli_args, hf_logits, long_rows, make_base, read_jsonl, reference_nll, short_rows, write_jsonl

STEPS = 6
# Flags over configs/tiny_cpu.py (which says max_steps 20, save_steps 10, save_total_limit 2, lr 1e-3).
FLAGS = dict(max_steps=STEPS, save_steps=3, save_total_limit=1, eval_steps=3, learning_rate=3e-3,
             per_device_train_batch_size=8, seed=0, data_seed=7)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_run")
    base = make_base(root / "base", seed=2)
    # 24 rows in bucket 32 and 24 in bucket 64: 6 batches of 8 an epoch.
    train = write_jsonl(root / "train.jsonl", short_rows(24, seed=1) + long_rows(24, seed=2))
    val = write_jsonl(root / "val.jsonl", short_rows(8, seed=11) + long_rows(8, seed=12))
    out = root / "out"
    argv = ["sft", "--config", str(CONFIGS / "tiny_cpu.py"), "--model", base, "--dataset", train,
            "--val_dataset", val, "--output_dir", str(out), *cli_args(FLAGS)]
    rc = main(argv)
    assert rc == 0
    return dict(root=root, base=base, train=train, out=out, log=read_jsonl(out / "logging.jsonl"))


def train_rows(log):
    return [r for r in log if "loss" in r]


def test_config_file_and_flags(run):
    args = json.loads((run["out"] / "args.json").read_text())
    # From the flags ...
    assert args["max_steps"] == STEPS and args["save_steps"] == 3 and args["learning_rate"] == 3e-3
    assert args["data_seed"] == 7
    # ... from configs/tiny_cpu.py where no flag was given ...
    assert args["length_buckets"] == "32,64" and args["max_length"] == 64 and args["gradient_checkpointing"] is False
    assert args["mesh"] == "data=1,fsdp=1,tensor=1" and args["weight_decay"] == 0.0
    # ... and the schema's ms-swift defaults for the rest.
    assert args["adam_beta2"] == 0.95 and args["max_grad_norm"] == 1.0 and args["lr_scheduler_type"] == "cosine"


def test_logging_jsonl_has_swift_metric_names(run):
    rows = train_rows(run["log"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("loss", "grad_norm", "learning_rate", "token_acc", "tokens_per_second", "seconds_per_step", "epoch"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), key
        assert r["tokens_per_second"] > 0 and r["seconds_per_step"] > 0 and 0 <= r["token_acc"] <= 1
    # The learning rate is cosine decay from 3e-3 over 6 steps, no warm-up: lr(step) = peak/2 (1 + cos(pi (step-1)/6)).
    for r in rows:
        expected = 3e-3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / STEPS))
        assert r["learning_rate"] == pytest.approx(expected, rel=1e-5)
    # Epochs: 6 batches of 8 an epoch, one batch a step.
    assert [r["epoch"] for r in rows] == pytest.approx([s / 6 for s in range(1, STEPS + 1)], abs=1e-3)
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [r for r in run["log"] if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(math.isfinite(r["eval_loss"]) and 0 <= r["eval_token_acc"] <= 1 for r in evals)


def test_curves_png_written(run):
    png = (run["out"] / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_first_logged_loss_is_nll_of_first_batch(run):
    """The loop feeds the iterator's first batch and logs that step's loss: check it by transformers."""
    tok = build_char_tokenizer()
    data = prepare_data(run["train"], "sft", tok, max_length=64, data_seed=7)
    it = BatchIterator(data.train, 8, make_buckets(64, buckets=[32, 64]), seed=7, pad_id=tok.pad_token_id)
    first = next(it)
    nll, acc = reference_nll(hf_logits(run["base"], first["input_ids"], first["attention_mask"]),
                             first["input_ids"], first["loss_mask"])
    row = train_rows(run["log"])[0]
    assert row["loss"] == pytest.approx(nll, rel=1e-5)
    assert row["token_acc"] == pytest.approx(acc, abs=1e-6)


def test_compilations_bounded_by_buckets(run):
    """One compilation per distinct padded batch shape the run saw: here both buckets, so exactly 2."""
    tok = build_char_tokenizer()
    data = prepare_data(run["train"], "sft", tok, max_length=64, data_seed=7)
    it = BatchIterator(data.train, 8, make_buckets(64, buckets=[32, 64]), seed=7, pad_id=tok.pad_token_id)
    shapes = {next(it)["input_ids"].shape for _ in range(STEPS)}
    assert shapes == {(8, 32), (8, 64)}
    rows = train_rows(run["log"])
    assert rows[-1]["compilations"] == len(shapes) == 2
    assert [r["compilations"] for r in rows] == sorted(r["compilations"] for r in rows)  # never more later


def test_checkpoints_pruned_to_limit(run):
    kept = sorted(p.name for p in run["out"].glob("checkpoint-*"))
    assert kept == ["checkpoint-6"]
    assert (run["out"] / "checkpoint-6" / "state").is_dir() and (run["out"] / "checkpoint-6" / "meta").exists()


def test_exported_model_matches_jaxalign_logits(run):
    """output_dir is a Hugging Face folder: transformers' logits equal jaxalign's for the trained weights."""
    from jaxalign.convert.checkpoint_io import load_checkpoint_model

    out = run["out"]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    trained = load_file(str(out / "model.safetensors"))
    base = load_file(str(run["base"] + "/model.safetensors"))
    assert trained.keys() == base.keys()
    assert all(not np.allclose(trained[k], base[k]) for k in trained if k.endswith("proj.weight"))

    tok = build_char_tokenizer()
    texts = ["<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n", "<|im_start|>user\n3+4="]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, e in enumerate(enc):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1
    ref = hf_logits(out, ids, mask)
    model = load_checkpoint_model(out / f"checkpoint-{STEPS}")
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    assert np.abs(ref[real]).max() > 0.3  # logits far above the tolerance


def test_export_command_from_checkpoint(run, capsys):
    dst = run["root"] / "exported"
    rc = main(["export", "--ckpt_dir", str(run["out"] / f"checkpoint-{STEPS}"), "--output_dir", str(dst)])
    assert rc == 0
    ours = load_file(str(dst / "model.safetensors"))
    final = load_file(str(run["out"] / "model.safetensors"))
    assert ours.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(ours[k], final[k])
    assert json.loads((dst / "config.json").read_text()) == json.loads((run["out"] / "config.json").read_text())
    assert (dst / "tokenizer.json").is_file()
    # A second export into the same folder is refused in one line.
    capsys.readouterr()
    assert main(["export", "--ckpt_dir", str(run["out"] / f"checkpoint-{STEPS}"), "--output_dir", str(dst)]) == 2
    assert "already holds a model" in capsys.readouterr().err
