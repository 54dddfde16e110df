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


def load_data(cfg, task: str, tokenizer, *, quiet: bool = False):
    """The run's train/val examples for ``task``, as the data options say; logs the drop counts."""
    from jaxalign.data import prepare_data

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


def run_mesh(spec):
    """The mesh ``--mesh`` asks for. Fixed sizes (no -1 axis) needing fewer devices than a
    single process has run on the first devices (e.g. ``data=1,fsdp=1,tensor=1`` on one of 8)."""
    import math

    import jax

    from jaxalign.parallel import make_mesh, parse_mesh_spec

    sizes = parse_mesh_spec(spec)
    devices = jax.devices()
    if -1 not in sizes.values() and jax.process_count() == 1:
        devices = devices[: math.prod(sizes.values())]
    return make_mesh(spec, devices=devices)


def start_run(cfg):
    """What every training run does first, after checking its options: refuse a used --output_dir,
    join the other hosts, build the mesh and load the tokenizer. Returns (mesh, tokenizer)."""
    from jaxalign.parallel import initialize_distributed

    check_output_dir(cfg)
    initialize_distributed()
    return run_mesh(cfg.mesh), load_tokenizer(cfg.model)


def build_trainer(cfg, algorithm, *, quiet: bool = False):
    """Mesh, tokenizer, model and data as ``cfg`` says, wrapped in a ready Trainer."""
    from jaxalign.trainers.checkpoint_model import load_any_model
    from jaxalign.trainers.loop import Trainer

    if not cfg.model:
        raise ConfigError("--model is required: a Hugging Face model folder")
    if not cfg.dataset:
        raise ConfigError("--dataset is required: a .jsonl/.json/.csv/.parquet file or a saved dataset folder")
    mesh, tokenizer = start_run(cfg)
    # Data before the model: a bad row is reported before a (possibly large) model is loaded.
    data = load_data(cfg, algorithm.task, tokenizer, quiet=quiet)
    model = load_any_model(cfg.model, dtype=cfg.torch_dtype, mesh=mesh)
    if hasattr(algorithm, "wrap_model"):  # e.g. rm: backbone + value head
        model = algorithm.wrap_model(model, mesh)
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

    if trainer.cfg.save_hf and hasattr(getattr(trainer, "algo", None), "export"):  # e.g. rm: backbone + value_head.safetensors
        trainer.algo.export(trainer)
    elif trainer.cfg.save_hf:
        save_hf_model(trainer.model(), trainer.cfg.output_dir, tokenizer=trainer.tokenizer, overwrite=True)


def run_offline(cfg, algorithm, *, quiet: bool = False):
    """Train ``algorithm`` as ``cfg`` says and export; return the Trainer (``trainer.history``)."""
    trainer = build_trainer(cfg, algorithm, quiet=quiet)
    trainer.history = trainer.train()
    finish(trainer)
    return trainer


def build_grpo_trainer(cfg, *, quiet: bool = False):
    """Policy, prompts and reward functions for GRPO, wrapped in a ready GRPOTrainer."""
    from jaxalign.rewards import build_reward_funcs
    from jaxalign.trainers.checkpoint_model import load_any_model
    from jaxalign.trainers.grpo import GRPOTrainer, split_names

    if not cfg.model or not cfg.dataset:
        raise ConfigError("--model and --dataset are required for GRPO (prompt-only messages plus extra columns)")
    names = split_names(cfg.reward_funcs)
    if not names and not cfg.reward_model:
        raise ConfigError("--reward_funcs: GRPO needs at least one reward function (accuracy, format, cosine, "
                          "repetition, soft_overlong, a plugin's) or --reward_model")
    mesh, tokenizer = start_run(cfg)
    model = load_any_model(cfg.model, dtype=cfg.torch_dtype, mesh=mesh)
    options = {k: cfg[k] for k in cfg.keys()}
    funcs = build_reward_funcs(names, options, split_names(cfg.external_plugins))
    if cfg.reward_model:
        from jaxalign.rewards.model_reward import RewardModelReward

        funcs.append(RewardModelReward.from_path(cfg.reward_model, tokenizer, mesh=mesh, vocab_size=model.config.vocab_size))
    weights = [float(w) for w in split_names(cfg.reward_weights)] or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(f"--reward_weights has {len(weights)} values for {len(funcs)} reward functions; give one each")
    data = load_data(cfg, "grpo", tokenizer, quiet=quiet)
    return GRPOTrainer(cfg, model, tokenizer, data, mesh, funcs, weights)


def build_ppo_trainer(cfg, *, quiet: bool = False):
    """Policy, reference, reward and value models plus prompts, wrapped in a ready PPOTrainer."""
    from jaxalign.convert.value_head_io import load_reward_model
    from jaxalign.trainers.checkpoint_model import load_any_model
    from jaxalign.trainers.ppo import PPOTrainer

    if not cfg.model or not cfg.dataset:
        raise ConfigError("--model and --dataset are required for PPO (prompt-only messages)")
    if not cfg.reward_model:
        raise ConfigError("--reward_model is required for PPO: a reward-model export (backbone + value_head.safetensors)")
    mesh, tokenizer = start_run(cfg)
    policy = load_any_model(cfg.model, dtype=cfg.torch_dtype, mesh=mesh)
    ref = load_any_model(cfg.ref_model or cfg.model, dtype=cfg.torch_dtype, mesh=mesh)
    reward = load_reward_model(cfg.reward_model, dtype=cfg.torch_dtype, mesh=mesh)
    value = load_reward_model(cfg.value_model or cfg.reward_model, dtype=cfg.torch_dtype, mesh=mesh)
    for name, m in (("--reward_model", reward), ("--value_model", value), ("--ref_model", ref)):
        if m.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(
                f"{name}: vocabulary of {m.config.vocab_size} tokens differs from the policy's {policy.config.vocab_size}; "
                "PPO needs models that share the tokenizer"
            )
    data = load_data(cfg, "ppo", tokenizer, quiet=quiet)
    return PPOTrainer(cfg, policy, ref, reward, value, tokenizer, data, mesh)
