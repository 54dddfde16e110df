"""From a resolved config to a finished run: mesh, tokenizer, data, model, Trainer, export."""

from __future__ import annotations

import json
from pathlib import Path

from jaxalign.algorithms import make_algorithm
from jaxalign.config import check_required_inputs
from jaxalign.convert.checkpoint_io import load_any_model, read_model_type
from jaxalign.data import prepare_data
from jaxalign.data.formats import parse_columns
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.errors import ConfigError, DataError
from jaxalign.parallel import initialize_distributed, run_mesh
from jaxalign.parallel.distributed import say
from jaxalign.trainers.checkpoint import list_checkpoints, resolve_resume
from jaxalign.trainers.trainer import Trainer
from jaxalign.trainers.tuner import apply_tuner


def load_data(cfg, task: str, tokenizer, *, quiet: bool = False):
    """The run's train/val examples for ``task``, as the data options say; logs the drop counts."""
    data = prepare_data(
        cfg.dataset, task, tokenizer, val_dataset=cfg.val_dataset, split_dataset_ratio=cfg.split_dataset_ratio,
        data_seed=cfg.data_seed, template=cfg.template, model_type=read_model_type(cfg.model), max_length=cfg.max_length,
        truncation_strategy=cfg.truncation_strategy, loss_scale=cfg.loss_scale, ignore_bad_rows=cfg.ignore_bad_rows,
        columns=parse_columns(cfg.columns),
    )
    if not quiet:
        say("jaxalign: data " + json.dumps(data.stats))
    if not data.train:
        raise DataError(f"--dataset {cfg.dataset}: {_why_no_rows(data.stats, cfg.max_length)}")
    return data


def _why_no_rows(stats: dict, max_length: int) -> str:
    """Why no training row survived, and the fix that applies."""
    reasons, fixes = [], []
    if stats.get("deleted_too_long"):
        reasons.append(f"{stats['deleted_too_long']} longer than --max_length {max_length}, deleted")
    if stats.get("no_loss_tokens"):
        reasons.append(f"{stats['no_loss_tokens']} with no trained token left after truncation")
    if reasons:
        fixes.append("raise --max_length or choose --truncation_strategy left or right")
    if stats.get("bad_rows"):
        reasons.append(f"{stats['bad_rows']} malformed, skipped")
        fixes.append("fix the malformed rows (run without --ignore_bad_rows to see the first)")
    if not reasons:
        return "holds no rows; add data"
    return f"no usable training rows ({'; '.join(reasons)}); {' or '.join(fixes)}"


def check_output_dir(cfg) -> None:
    """Refuse to train into a folder holding someone's model unless resuming a run there."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out}: is a file, not a folder; choose another --output_dir")
    if cfg.resume_from_checkpoint:
        resolve_resume(cfg.resume_from_checkpoint, out)  # a missing checkpoint is named before any model loads
        return
    if (out / "config.json").exists() and not (out / "args.json").exists():
        raise ConfigError(f"--output_dir {out}: holds a model that is not a jaxalign run; choose another folder")
    if list_checkpoints(out):  # complete ones: a killed save's temporary folder is removed at the start
        raise ConfigError(
            f"--output_dir {out}: already holds checkpoints; pass --resume_from_checkpoint latest or choose another folder"
        )


def build_trainer(cfg, algorithm=None, *, quiet: bool = False) -> Trainer:
    """Mesh, tokenizer, data and models as ``cfg`` says (the algorithm from the registry unless given),
    wrapped in a ready Trainer. Data comes before the model: a bad row is reported before a (possibly
    large) model is loaded."""
    initialize_distributed()  # first: JAX refuses to join the hosts once anything has touched a backend
    if not cfg.model and cfg.get("adapters"):  # as ms-swift: the adapter's config names its base
        from jaxalign.convert.peft_io import read_adapter_config

        cfg.model = read_adapter_config(cfg.adapters, "--adapters")[1]
    check_required_inputs(cfg)
    algorithm = algorithm or make_algorithm(cfg)
    check_output_dir(cfg)
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
