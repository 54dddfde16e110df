"""Model folders out: a jaxalign checkpoint or model folder -> a Hugging Face folder, and a Hugging Face
folder -> a parameters-only orbax checkpoint laid out for a mesh (what a pod restores from)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxalign.convert.checkpoint_io import is_reward_checkpoint, load_checkpoint_model
from jaxalign.convert.hf_load import load_hf_model
from jaxalign.convert.hf_save import save_hf_model
from jaxalign.convert.value_head_io import save_reward_model
from jaxalign.data.tokenizer import load_tokenizer_if_present
from jaxalign.errors import CheckpointError

IMPORTED_STEP = 0  # an imported model is a checkpoint of step 0 of no run


def export_checkpoint(ckpt_dir: str | Path, output_dir: str | Path, *, max_shard_size: str = "5GB") -> tuple[Path, str]:
    """``output_dir/checkpoint-N`` -> a Hugging Face folder (a reward model with value_head.safetensors).
    Returns the folder and a one-line description."""
    src = Path(ckpt_dir)
    tokenizer = load_tokenizer_if_present(src.parent / "tokenizer")
    if is_reward_checkpoint(src):
        out = save_reward_model(load_checkpoint_model(src, value_head=True), output_dir, tokenizer=tokenizer,
                                max_shard_size=max_shard_size)
        return out, f"exported {src} -> {out} (with value_head.safetensors)"
    out = save_hf_model(load_checkpoint_model(src), output_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
    return out, f"exported {src} -> {out}"


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
