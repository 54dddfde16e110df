"""Write a jaxalign Decoder as a Hugging Face folder that transformers and vLLM load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxalign.convert.safetensors_io import write_shards
from jaxalign.convert.weight_map import weight_table
from jaxalign.errors import CheckpointError
from jaxalign.models.decoder import Decoder
from jaxalign.parallel.distributed import host_array

_HF_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def hf_tensors(model: Decoder):
    """Yield (Hugging Face name, float32 numpy array) for every weight, one at a time."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for e in weight_table(model.config):
        value = flat[e.path][...]
        if e.layer is not None:  # one layer of a stacked parameter, sliced on the devices before the gather
            value = value[e.layer]
        arr = host_array(value).astype(np.float32)
        yield e.hf_name, (arr.T if e.transpose else arr)


def generation_config_dict(model: Decoder) -> dict:
    c = model.config
    if c.generation_config:
        return dict(c.generation_config)
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(c, key)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def save_hf_model(
    model: Decoder,
    path: str | Path,
    *,
    tokenizer=None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    extra_files=None,
    tensors=None,
    hf_config: dict | None = None,
) -> Path:
    """Write config.json, generation_config.json, safetensors (sharded past ``max_shard_size``)
    and the tokenizer to ``path``, staged in a temporary folder and renamed when complete.

    An existing folder that already holds a model is refused unless ``overwrite``.
    ``extra_files`` is an optional callable ``f(staging_dir)`` writing more files (a value head);
    ``tensors`` ((name, array) pairs) and ``hf_config`` replace the causal LM's own (another head).
    """
    dst = Path(path)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a folder; choose another --output_dir")
    if dst.is_dir() and not overwrite and any((dst / n).exists() for n in _HF_MODEL_FILES):
        raise CheckpointError(f"{dst}: already holds a model; choose a new --output_dir or remove the old one")
    writer = jax.process_index() == 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    if writer:
        remove_stale_staging(dst)
    staging = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        tensors = hf_tensors(model) if tensors is None else tensors
        hf_config = model.config.to_hf_dict() if hf_config is None else hf_config
        if writer:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            write_shards(tensors, staging, max_shard_size)
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
            (staging / "generation_config.json").write_text(json.dumps(generation_config_dict(model), indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            if extra_files is not None:
                extra_files(staging)
            _publish(staging, dst)
        else:
            for _ in tensors:  # take part in the collective gathers
                pass
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dst


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(dst: str | Path) -> list[Path]:
    """Remove the ``.NAME.tmp-PID`` staging folders of exports to ``dst`` whose process is gone (one
    killed mid-export); a live process's staging folder is left alone. Returns what was removed."""
    dst = Path(dst)
    removed = []
    if not dst.parent.is_dir():
        return removed
    prefix = f".{dst.name}.tmp-"
    for p in dst.parent.iterdir():
        if not p.name.startswith(prefix) or not p.name[len(prefix):].isdigit():
            continue
        pid = int(p.name[len(prefix):])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _publish(staging: Path, dst: Path) -> None:
    """Move the finished staging folder into place: a rename, or per-file replaces into an existing folder."""
    if not dst.exists():
        os.replace(staging, dst)
        return
    for old in dst.glob("model-*-of-*.safetensors"):
        old.unlink()
    for item in staging.iterdir():
        target = dst / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
