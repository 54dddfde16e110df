"""Model folders out: a jaxalign checkpoint or model folder -> a Hugging Face folder, and a Hugging Face
folder -> a parameters-only orbax checkpoint laid out for a mesh (what a pod restores from)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxalign.convert.checkpoint_io import (
    is_checkpoint,
    is_reward_checkpoint,
    load_any_model,
    load_checkpoint_model,
    lora_checkpoint_settings,
    read_meta,
)
from jaxalign.convert.peft_io import ADAPTER_CONFIG, apply_adapter, read_adapter_config, save_adapter
from jaxalign.convert.hf_load import load_hf_model
from jaxalign.convert.hf_save import save_hf_model
from jaxalign.convert.reward_model import head_files, save_reward_model_folder
from jaxalign.convert.value_head_io import VALUE_HEAD_FILE, load_value_head
from jaxalign.data.tokenizer import load_tokenizer_if_present
from jaxalign.errors import CheckpointError
from jaxalign.models.lora import merge_lora
from jaxalign.models.value_head import RewardModel

IMPORTED_STEP = 0  # an imported model is a checkpoint of step 0 of no run


def export_checkpoint(ckpt_dir: str | Path, output_dir: str | Path, *, max_shard_size: str = "5GB",
                      merge_lora: bool = False) -> tuple[Path, str]:
    """``output_dir/checkpoint-N`` -> a Hugging Face folder (a reward model with value_head.safetensors); a LoRA
    run's checkpoint -> its adapter in PEFT's format, or with ``merge_lora`` the merged model.
    Returns the folder and a one-line description."""
    src = Path(ckpt_dir)
    tokenizer = load_tokenizer_if_present(src.parent / "tokenizer")
    if is_checkpoint(src) and read_meta(src).get("lora"):
        settings, base = lora_checkpoint_settings(read_meta(src))
        model = load_checkpoint_model(src, value_head=True)
        return _write_adapted(model, output_dir, settings=settings, base=base, tokenizer=tokenizer, merge=merge_lora,
                              max_shard_size=max_shard_size, source=str(src))
    if is_reward_checkpoint(src):
        model = load_checkpoint_model(src, value_head=True)
        out = save_reward_model_folder(model, output_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
        layout = "a *ForSequenceClassification folder" if model.head == "seq_cls" else "with value_head.safetensors"
        return out, f"exported {src} -> {out} ({layout})"
    out = save_hf_model(load_checkpoint_model(src), output_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
    return out, f"exported {src} -> {out}"


def export_adapters(adapters: str | Path, output_dir: str | Path, *, model: str | None = None,
                    max_shard_size: str = "5GB") -> tuple[Path, str]:
    """A PEFT LoRA adapter folder merged into its base (``model``, else the adapter config's
    ``base_model_name_or_path``) as a Hugging Face folder; with ``value_head.safetensors`` beside the adapter,
    a reward model. Returns the folder and a line."""
    src = Path(adapters)
    settings, config_base = read_adapter_config(src, "--adapters")
    base = model or config_base
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"--adapters {src}: its base model {base!r} is not a folder here; pass --model BASE")
    backbone = load_any_model(base)
    if (src / VALUE_HEAD_FILE).is_file():
        adapted = RewardModel(backbone, load_value_head(src, backbone.config.hidden_size))
    else:
        adapted = backbone
    apply_adapter(adapted, src)
    tokenizer = load_tokenizer_if_present(src) or load_tokenizer_if_present(base)
    return _write_adapted(adapted, output_dir, settings=settings, base=base, tokenizer=tokenizer, merge=True,
                          max_shard_size=max_shard_size, source=f"{src} on {base}")


def _write_adapted(model, output_dir, *, settings, base, tokenizer, merge: bool, max_shard_size: str, source: str):
    """An adapted decoder or reward model: merged into a Hugging Face folder, or its adapter in PEFT's format."""
    reward = isinstance(model, RewardModel)
    if merge:
        merge_lora(model)
        if reward:
            out = save_reward_model_folder(model, output_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
        else:
            out = save_hf_model(model, output_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
        return out, f"exported {source} -> {out} (LoRA merged)"
    dst = Path(output_dir)
    if (dst / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{dst}: already holds an adapter; choose a new --output_dir or remove the old one")
    extra = head_files(model) if reward else None
    out = save_adapter(model.backbone if reward else model, dst, settings=settings, base_model=base,
                       tokenizer=tokenizer, extra_files=extra)
    return out, f"exported {source} -> {out} (LoRA adapter; --merge_lora true writes the merged model)"


def export_hf_folder(model_dir: str | Path, output_dir: str | Path, *, max_shard_size: str = "5GB") -> tuple[Path, str]:
    """A Hugging Face folder re-written (e.g. re-sharded) through jaxalign; returns the folder and a line."""
    src = Path(model_dir)
    out = save_hf_model(load_hf_model(src), output_dir, tokenizer=load_tokenizer_if_present(src),
                        max_shard_size=max_shard_size)
    return out, f"exported {src} -> {out}"


def import_hf_folder(model_dir: str | Path, output_dir: str | Path, *, mesh) -> Path:
    """A Hugging Face folder -> ``output_dir/checkpoint-0`` (parameters only, each array saved with its
    sharding on ``mesh``) plus ``output_dir/tokenizer``; ``--model output_dir/checkpoint-0`` trains from
    it, ``jaxalign export`` turns it back. Returns the checkpoint folder."""
    src, out = Path(model_dir), Path(output_dir)
    ckpt = out / f"checkpoint-{IMPORTED_STEP}"
    if ckpt.exists():
        raise CheckpointError(f"{ckpt}: already exists; choose a new --output_dir or remove the old one")
    tokenizer = load_tokenizer_if_present(src)
    model = load_hf_model(src, mesh=mesh)
    params = nnx.state(model, nnx.Param)
    meta = {
        "step": IMPORTED_STEP,
        "algorithm": "import",
        "source": str(src.absolute()),
        "mesh": dict(mesh.shape),
        "model_config": model.config.to_hf_dict(),
        "generation_config": model.config.generation_config,
    }
    out.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())  # writes to a temporary name, renames when done
    ckptr.save(ckpt.absolute(), args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                                        meta=ocp.args.JsonSave(meta)))
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    return ckpt
