"""``value_head.safetensors`` beside a Hugging Face folder (TRL's / ms-swift's value-head layout)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxalign.convert.hf_load import load_hf_model
from jaxalign.convert.hf_save import save_hf_model
from jaxalign.errors import CheckpointError
from jaxalign.models.value_head import RewardModel, ValueHead
from jaxalign.parallel.distributed import host_array
from jaxalign.parallel.rules import param_shardings

VALUE_HEAD_FILE = "value_head.safetensors"
WEIGHT = "v_head.summary.weight"  # [1, hidden]
BIAS = "v_head.summary.bias"  # [1]


def value_head_tensors(head: ValueHead) -> dict[str, np.ndarray]:
    """The head as TRL names it: weight [1, hidden] and bias [1], float32 numpy."""
    kernel = host_array(head.summary.kernel[...]).astype(np.float32)  # every host calls: a collective when sharded
    bias = host_array(head.summary.bias[...]).astype(np.float32)
    return {WEIGHT: np.ascontiguousarray(kernel.T), BIAS: bias.reshape(1)}


def write_value_head_file(tensors: dict[str, np.ndarray], folder: str | Path) -> Path:
    """Write the head's tensors to ``folder/value_head.safetensors`` atomically (metadata ``{"format": "pt"}``)."""
    dst = Path(folder) / VALUE_HEAD_FILE
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(dst)
    return dst


def value_head_writer(head: ValueHead):
    """Gather the head now (every host must call this: a collective when it is sharded) and return
    ``write(folder)``, which a single writer calls as a save's ``extra_files``."""
    tensors = value_head_tensors(head)
    return lambda folder: write_value_head_file(tensors, folder)


def load_value_head(folder: str | Path, hidden: int) -> ValueHead:
    """The head stored in ``folder/value_head.safetensors`` for a backbone of width ``hidden``."""
    src = Path(folder) / VALUE_HEAD_FILE
    if not src.is_file():
        raise CheckpointError(f"{src}: missing; a reward model folder needs {VALUE_HEAD_FILE} beside the backbone")
    try:
        tensors = load_file(str(src))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{src}: not a readable safetensors file ({e})") from None
    for name, shape in ((WEIGHT, (1, hidden)), (BIAS, (1,))):
        if name not in tensors:
            raise CheckpointError(f"{src}: tensor {name!r} is missing (found {', '.join(sorted(tensors)) or 'none'})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{src}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    head = ValueHead(hidden, rngs=nnx.Rngs(0))
    head.summary.kernel[...] = np.asarray(tensors[WEIGHT], np.float32).T
    head.summary.bias[...] = np.asarray(tensors[BIAS], np.float32)
    return head


def place_on_mesh(module, mesh):
    """Put a module's params on their mesh shardings (no-op without a mesh)."""
    if mesh is None:
        return module
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params = jax.device_put(params, param_shardings(params, mesh))
    return nnx.merge(graphdef, params, rest)


def load_value_head_reward_model(path: str | Path, *, dtype: str = "float32", mesh=None) -> RewardModel:
    """A Hugging Face backbone folder plus its ``value_head.safetensors`` as a RewardModel."""
    folder = Path(path)
    if not (folder / VALUE_HEAD_FILE).is_file():
        raise CheckpointError(f"{folder / VALUE_HEAD_FILE}: missing; {folder} is not a reward model folder "
                              "(train one with `jaxalign rlhf --rlhf_type rm`)")
    backbone = load_hf_model(folder, dtype=dtype, mesh=mesh)
    head = place_on_mesh(load_value_head(folder, backbone.config.hidden_size), mesh)
    return RewardModel(backbone, head)


def save_reward_model(model: RewardModel, path: str | Path, *, tokenizer=None, overwrite: bool = False, **kw) -> Path:
    """The backbone as a Hugging Face folder with ``value_head.safetensors`` beside it (one atomic write)."""
    return save_hf_model(model.backbone, path, tokenizer=tokenizer, overwrite=overwrite,
                         extra_files=value_head_writer(model.v_head), **kw)
