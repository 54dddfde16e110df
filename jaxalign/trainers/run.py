"""From a resolved config to a finished run: mesh, tokenizer, model, data, Trainer, export."""

from __future__ import annotations

import json
from pathlib import Path

from jaxalign.errors import CheckpointError, ConfigError


def load_tokenizer(folder: str | Path):
    """The tokenizer saved with a model (no download); refuse a folder without one."""
    from transformers import AutoTokenizer

    p = Path(folder)
    for cand in (p, p / "tokenizer", p.parent / "tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(cand))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return tok
    raise CheckpointError(f"{p}: no tokenizer files (tokenizer.json / tokenizer_config.json); save the tokenizer with the model")


def check_output_dir(cfg) -> None:
    """Refuse to train into a folder holding someone's model unless resuming a run there."""
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint:
        return
    if (out / "config.json").exists() and not (out / "args.json").exists():
        raise ConfigError(f"--output_dir {out}: holds a model that is not a jaxalign run; choose another folder")
    if any(out.glob("checkpoint-*")):
        raise ConfigError(
            f"--output_dir {out}: already holds checkpoints; pass --resume_from_checkpoint latest or choose another folder"
        )


def build_trainer(cfg, algorithm, *, quiet: bool = False):
    """Mesh, tokenizer, model and data as ``cfg`` says, wrapped in a ready Trainer."""
    from jaxalign.data import prepare_data
    from jaxalign.parallel import initialize_distributed, make_mesh
    from jaxalign.trainers.checkpoint_model import load_any_model
    from jaxalign.trainers.loop import Trainer

    if not cfg.model:
        raise ConfigError("--model is required: a Hugging Face model folder")
    if not cfg.dataset:
        raise ConfigError("--dataset is required: a .jsonl/.json/.csv/.parquet file or a saved dataset folder")
    check_output_dir(cfg)
    initialize_distributed()
    mesh = make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg.model)
    model = load_any_model(cfg.model, dtype=cfg.torch_dtype, mesh=mesh)
    data = prepare_data(
        cfg.dataset,
        algorithm.task,
        tokenizer,
        val_dataset=cfg.val_dataset,
        split_dataset_ratio=cfg.split_dataset_ratio,
        data_seed=cfg.data_seed,
        template=cfg.template,
        max_length=cfg.max_length,
        truncation_strategy=cfg.truncation_strategy,
        loss_scale=cfg.loss_scale,
        ignore_bad_rows=cfg.ignore_bad_rows,
    )
    if not quiet:
        print("jaxalign: data " + json.dumps(data.stats))
    if getattr(algorithm, "needs_reference", False) and cfg.get("ref_model"):
        from flax import nnx

        ref = load_any_model(cfg.ref_model, dtype=cfg.torch_dtype, mesh=mesh)
        if ref.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"--ref_model {cfg.ref_model}: vocabulary {ref.config.vocab_size} differs from the model's {model.config.vocab_size}")
        algorithm.ref_params = nnx.state(ref, nnx.Param)
    return Trainer(cfg, algorithm, model, tokenizer, data, mesh)


def finish(trainer) -> None:
    """Export the final policy into output_dir as a Hugging Face folder (unless --save_hf false)."""
    from jaxalign.convert import save_hf_model

    if trainer.cfg.save_hf:
        save_hf_model(trainer.model(), trainer.cfg.output_dir, tokenizer=trainer.tokenizer, overwrite=True)


def run_offline(cfg, algorithm, *, quiet: bool = False):
    """Train ``algorithm`` as ``cfg`` says and export; return the Trainer (``trainer.history``)."""
    trainer = build_trainer(cfg, algorithm, quiet=quiet)
    trainer.history = trainer.train()
    finish(trainer)
    return trainer
