"""From a resolved config to a finished run: mesh, tokenizer, data, model, Trainer, export."""

from __future__ import annotations

import json
from pathlib import Path

from jaxalign.algorithms import make_algorithm
from jaxalign.config import check_required_inputs
from jaxalign.convert.checkpoint_io import load_any_model
from jaxalign.data import prepare_data
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import ConfigError
from jaxalign.parallel import initialize_distributed, run_mesh
from jaxalign.trainers.trainer import Trainer
from jaxalign.trainers.tuner import apply_tuner


def load_data(cfg, task: str, tokenizer, *, quiet: bool = False):
    """The run's train/val examples for ``task``, as the data options say; logs the drop counts."""
    data = prepare_data(
        cfg.dataset, task, tokenizer, val_dataset=cfg.val_dataset, split_dataset_ratio=cfg.split_dataset_ratio,
        data_seed=cfg.data_seed, template=cfg.template, max_length=cfg.max_length,
        truncation_strategy=cfg.truncation_strategy, loss_scale=cfg.loss_scale, ignore_bad_rows=cfg.ignore_bad_rows,
    )
    if not quiet:
        print("jaxalign: data " + json.dumps(data.stats))
    return data


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


def build_trainer(cfg, algorithm=None, *, quiet: bool = False) -> Trainer:
    """Mesh, tokenizer, data and models as ``cfg`` says (the algorithm from the registry unless given),
    wrapped in a ready Trainer. Data comes before the model: a bad row is reported before a (possibly
    large) model is loaded."""
    if not cfg.model and cfg.get("adapters"):  # as ms-swift: the adapter's config names its base
        from jaxalign.convert.peft_io import read_adapter_config

        cfg.model = read_adapter_config(cfg.adapters, "--adapters")[1]
    check_required_inputs(cfg)
    algorithm = algorithm or make_algorithm(cfg)
    check_output_dir(cfg)
    initialize_distributed()
    mesh, tokenizer = run_mesh(cfg.mesh), load_tokenizer(cfg.model)
    data = load_data(cfg, algorithm.name, tokenizer, quiet=quiet)
    model = load_any_model(cfg.model, dtype=cfg.torch_dtype, mesh=mesh)
    model = apply_tuner(cfg, algorithm, algorithm.prepare_model(model, mesh, tokenizer))
    return Trainer(cfg, algorithm, model, tokenizer, data, mesh)


def train(cfg, algorithm=None, *, quiet: bool = False) -> Trainer:
    """Train as ``cfg`` says and export (unless ``--save_hf false``); returns the Trainer."""
    trainer = build_trainer(cfg, algorithm, quiet=quiet)
    trainer.train()
    if cfg.save_hf:
        trainer.export()
    return trainer
