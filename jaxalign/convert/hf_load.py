"""Load a Hugging Face causal-LM folder (safetensors, single file or sharded) into a jaxalign Decoder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign.convert.safetensors_io import SafetensorsFile
from jaxalign.convert.weight_map import tolerated_extra, weight_table
from jaxalign.errors import CheckpointError
from jaxalign.models.config import ModelConfig, config_from_hf
from jaxalign.models.decoder import Decoder
from jaxalign.parallel.rules import param_shardings


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model folder (config.json, generation_config.json)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder; pass a Hugging Face model directory")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: no config.json; pass a Hugging Face model folder (config.json + *.safetensors)")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e}); restore the file") from None
    config = config_from_hf(raw, source=str(cfg_file))
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        try:
            config = dataclasses.replace(config, generation_config=json.loads(gen_file.read_text()))
        except ValueError:
            pass
    return config


def open_weights(folder: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the memory-mapped file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise CheckpointError(f"{index}: unreadable index (no weight_map); restore the file") from None
        files = {}
        for fname in sorted(set(weight_map.values())):
            if not (folder / fname).is_file():
                raise CheckpointError(f"{index}: shard {fname} is missing from {folder}; copy all shards")
            files[fname] = SafetensorsFile(folder / fname)
        out = {}
        for name, fname in weight_map.items():
            if name not in files[fname].entries:
                raise CheckpointError(f"{folder / fname}: tensor {name!r} listed in the index is not in the shard")
            out[name] = files[fname]
        return out
    candidates = sorted(folder.glob("*.safetensors"))
    candidates = [c for c in candidates if c.name != "value_head.safetensors"]
    if not candidates:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise CheckpointError(
                f"{folder}: only pickle weights (*.bin/*.pt) found; jaxalign reads safetensors only — "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    out = {}
    for c in candidates:
        f = SafetensorsFile(c)
        for name in f.keys():
            out[name] = f
    return out


def abstract_model(config: ModelConfig, dtype="float32") -> Decoder:
    """A Decoder with shapes only (no memory), to be filled with loaded weights."""
    return nnx.eval_shape(lambda: Decoder(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))


def load_hf_model(path: str | Path, *, dtype: str = "float32", mesh: Mesh | None = None, rules=None) -> Decoder:
    """Load a Hugging Face Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma 2/Gemma 3 (text) folder as a jaxalign Decoder.

    Tensors are read one at a time from memory-mapped safetensors and placed straight onto
    their sharding when ``mesh`` is given. Parameters are float32; ``dtype`` is the compute dtype.
    """
    folder = Path(path)
    return load_decoder(folder, read_config(folder), open_weights(folder), dtype=dtype, mesh=mesh, rules=rules)


def load_decoder(folder: Path, config: ModelConfig, tensors: dict[str, SafetensorsFile], *, dtype: str = "float32",
                 mesh: Mesh | None = None, rules=None) -> Decoder:
    """A Decoder of ``config`` filled from ``tensors`` (name -> file) through the weight table; every tensor
    must be mapped or harmless."""
    table = weight_table(config)
    model = abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    shardings = dict(nnx.to_flat_state(param_shardings(state, mesh, rules))) if mesh is not None else None

    expected_names = {e.hf_name for e in table}
    for name in tensors:
        if name not in expected_names and not tolerated_extra(name, config):
            raise CheckpointError(
                f"{tensors[name].path}: unexpected tensor {name!r} for a {config.model_type} model with this "
                "config.json; the checkpoint and config do not match"
            )
    sources: dict[tuple, dict[int | None, np.ndarray]] = {}  # path -> {layer: [in, out]-oriented view}
    for e in table:
        if e.hf_name not in tensors:
            raise CheckpointError(
                f"{folder}: tensor {e.hf_name!r} is missing from the checkpoint; the weights and config.json "
                "do not match — re-download or re-export the model"
            )
        f = tensors[e.hf_name]
        want = tuple(flat[e.path].shape)
        if e.layer is not None:
            want = want[1:]
        have = f.shape(e.hf_name)
        if (have[::-1] if e.transpose else have) != want:
            hf_want = want[::-1] if e.transpose else want
            raise CheckpointError(
                f"{f.path}: tensor {e.hf_name!r} has shape {list(have)}, config.json implies {list(hf_want)}; "
                "the weights and config.json do not match — re-download or re-export the model"
            )
        arr = f.get(e.hf_name)
        sources.setdefault(e.path, {})[e.layer] = arr.T if e.transpose else arr
    values = {}
    for path, parts in sources.items():
        sharding = None if shardings is None else shardings[path]
        shape = tuple(flat[path].shape)
        if None in parts:
            values[path] = _place(parts[None], shape, sharding)
        else:
            values[path] = _place_stacked([parts[i] for i in range(len(parts))], shape, sharding)
    pure = {}
    for p, v in values.items():
        node = pure
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = v
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _place_stacked(layers: list[np.ndarray], shape: tuple[int, ...], sharding) -> jax.Array:
    """Float32 device array [L, ...] of the per-layer (memory-mapped) views, each device reading only its slice."""
    if sharding is None:
        return jnp.asarray(np.stack([np.asarray(a, dtype=np.float32) for a in layers]))

    def read(idx):
        return np.stack([np.asarray(layers[i][idx[1:]], dtype=np.float32) for i in range(*idx[0].indices(len(layers)))])

    return jax.make_array_from_callback(shape, sharding, read)


def _place(arr: np.ndarray, shape: tuple[int, ...], sharding) -> jax.Array:
    """Float32 device array from a (memory-mapped) numpy view, reading only each device's slice."""
    if sharding is None:
        return jnp.asarray(np.asarray(arr, dtype=np.float32))
    return jax.make_array_from_callback(shape, sharding, lambda idx: np.asarray(arr[idx], dtype=np.float32))
