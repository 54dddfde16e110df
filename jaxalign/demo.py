"""`jaxalign demo`: the whole pipeline on an embedded tiny model and a checkable synthetic task.

No network and no files from outside: a character tokenizer and a tiny Llama are built here,
the task is multi-digit addition ("12+345=" -> "357") whose answers are checked exactly, and
each stage reports held-out exact-match accuracy before and after into ``summary.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from jaxalign.errors import ConfigError

DIGITS = (1, 2)
MAX_NEW_TOKENS = 8


def _write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def prepare_output_dir(out: Path) -> None:
    """A fresh folder; a previous demo's folder (it has demo.json) is replaced, anything else refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").exists():
            raise ConfigError(f"--output_dir {out}: exists and is not a jaxalign demo folder; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"created": time.time()}))


def build_base(out: Path, seed: int):
    """The embedded tokenizer and tiny random Llama, saved as a Hugging Face folder."""
    from jaxalign.convert import save_hf_model
    from jaxalign.data import build_char_tokenizer
    from jaxalign.models.factory import llama_config, random_model

    tok = build_char_tokenizer()
    cfg = llama_config(
        len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    model = random_model(cfg, seed=seed)
    save_hf_model(model, out / "base", tokenizer=tok)
    return model, tok


def stage_options(**overrides) -> dict[str, Any]:
    """Training options shared by the demo's stages (small model, short sequences, one compile)."""
    base = dict(
        max_length=64, length_buckets="32,64", per_device_train_batch_size=32, gradient_accumulation_steps=1,
        gradient_checkpointing=False, logging_steps=25, save_steps=100000, warmup_ratio=0.05,
        mesh="data=1,fsdp=1,tensor=1", lr_scheduler_type="cosine", weight_decay=0.0,
    )
    base.update(overrides)
    return base


def run_demo(output_dir: str = "demo_output", *, sft_steps: int = 400, seed: int = 0, heldout: int = 200) -> dict:
    """Run every demo stage; return (and write) the summary."""
    from jaxalign.config import resolve
    from jaxalign.data import make_addition_rows
    from jaxalign.evaluation import exact_match_accuracy
    from jaxalign.trainers.run import build_trainer, finish
    from jaxalign.trainers.sft import SFT

    out = Path(output_dir)
    prepare_output_dir(out)
    t_start = time.time()
    heldout_rows = make_addition_rows(heldout, seed=seed + 1, digits=DIGITS)
    exclude = [r["messages"][0]["content"] for r in heldout_rows]
    train_rows = make_addition_rows(4000, seed=seed, digits=DIGITS, exclude=exclude)
    data = out / "data"
    train_file = _write_jsonl(data / "sft_train.jsonl", train_rows)
    heldout_file = _write_jsonl(data / "heldout.jsonl", heldout_rows)
    base_model, tok = build_base(out, seed)
    summary: dict[str, Any] = {"task": f"addition of {DIGITS[0]}-{DIGITS[1]} digit numbers", "heldout_rows": heldout}

    # Stage 1: SFT
    print(f"jaxalign demo: SFT for {sft_steps} steps on {len(train_rows)} rows")
    acc_before, _ = exact_match_accuracy(base_model, tok, heldout_rows, max_new_tokens=MAX_NEW_TOKENS)
    cfg = resolve("sft", None, {
        "model": str(out / "base"), "dataset": train_file, "val_dataset": heldout_file,
        "output_dir": str(out / "sft"), "max_steps": sft_steps, "learning_rate": 2e-3, "seed": seed,
        **stage_options(eval_steps=max(sft_steps // 4, 1)),
    })
    t0 = time.time()
    trainer = build_trainer(cfg, SFT(), quiet=True)
    loss_before = trainer.eval_metrics().get("eval_loss")
    trainer.history = trainer.train()
    finish(trainer)
    acc_after, samples = exact_match_accuracy(trainer.model(), tok, heldout_rows, max_new_tokens=MAX_NEW_TOKENS)
    evals = [r for r in trainer.history if "eval_loss" in r]
    summary["sft"] = {
        "steps": sft_steps,
        "seconds": round(time.time() - t0, 1),
        "heldout_exact_match_before": acc_before,
        "heldout_exact_match_after": acc_after,
        "heldout_loss_before": loss_before,
        "heldout_loss_after": evals[-1]["eval_loss"] if evals else None,
        "compilations": trainer.counter.count,
        "samples": [
            {"prompt": r["messages"][0]["content"], "completion": s, "solution": r["solution"]}
            for r, s in list(zip(heldout_rows, samples))[:5]
        ],
    }
    shutil.copy(out / "sft" / "curves.png", out / "curves.png")
    summary["seconds_total"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
