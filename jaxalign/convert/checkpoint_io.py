"""Models out of jaxalign checkpoint folders (``output_dir/checkpoint-N``): parameters only, onto shardings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from jaxalign.convert.hf_load import abstract_model, load_hf_model
from jaxalign.errors import CheckpointError
from jaxalign.models.config import config_from_hf
from jaxalign.models.value_head import RewardModel, ValueHead
from jaxalign.parallel.rules import param_shardings


def read_meta(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint (step, data position, config, model config)."""
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    out = ckptr.restore(Path(path).absolute(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "meta").exists() and (p / "state").exists()


def is_reward_checkpoint(path: str | Path) -> bool:
    """A checkpoint of ``--rlhf_type rm`` (a backbone plus a value head)."""
    return is_checkpoint(path) and read_meta(Path(path)).get("algorithm") == "rm"


def load_checkpoint_model(path: str | Path, *, dtype: str = "float32", value_head: bool = False, mesh=None):
    """The policy saved in ``output_dir/checkpoint-N`` as a Decoder.

    Only the parameters are read (not the optimizer state), each straight onto its sharding on
    ``mesh`` (or the default device), whatever mesh the checkpoint was written from. A reward-model
    checkpoint gives its backbone, or with ``value_head=True`` the whole
    :class:`jaxalign.models.value_head.RewardModel`."""
    p = Path(path)
    if not is_checkpoint(p):
        raise CheckpointError(f"{p}: not a jaxalign checkpoint folder (expected state/ and meta/ inside)")
    meta = read_meta(p)
    if meta.get("lora"):
        return load_lora_checkpoint(p, meta, dtype=dtype, value_head=value_head, mesh=mesh)
    config = config_from_hf(meta["model_config"], source=f"{p}/meta")
    if meta.get("generation_config"):
        config = dataclasses.replace(config, generation_config=meta["generation_config"])
    reward = meta.get("algorithm") == "rm"
    if reward:
        head = nnx.eval_shape(lambda: ValueHead(config.hidden_size, rngs=nnx.Rngs(0)))
        abstract = RewardModel(abstract_model(config, dtype), head, **reward_head_kind(meta))
    else:
        abstract = abstract_model(config, dtype)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, restore_params(p, params, mesh))
    model = nnx.merge(graphdef, params, rest)
    if reward and not value_head:
        return model.backbone
    return model


def reward_head_kind(meta: dict) -> dict:
    """The head of an rm run's checkpoint (``--rm_head``; older runs: value_head) and, for seq_cls, the pad id it
    skips when picking the scored token (the run's tokenizer's, kept in the meta)."""
    head = (meta.get("config") or {}).get("rm_head") or "value_head"
    return {"head": head, "pad_token_id": meta.get("rm_pad_token_id") if head == "seq_cls" else None}


def lora_checkpoint_settings(meta: dict):
    """(LoRASettings, base model folder) of a ``--tuner_type lora`` checkpoint's meta."""
    from jaxalign.models.lora import LoRASettings

    raw = dict(meta["lora"])
    raw["target_modules"] = tuple(raw["target_modules"])
    return LoRASettings(**raw), (meta.get("config") or {}).get("model")


def load_lora_checkpoint(p: Path, meta: dict, *, dtype: str = "float32", value_head: bool = False, mesh=None):
    """A LoRA run's checkpoint (adapters, and an RM's head, only): the base it names, with the adapters attached."""
    from jaxalign.models.lora import add_lora, trainable_filter

    if meta.get("algorithm") == "ppo":
        raise CheckpointError(f"{p}: a PPO LoRA checkpoint holds two models' adapters; use the adapters the run "
                              "exported in its output_dir (and output_dir/value_model)")
    settings, base = lora_checkpoint_settings(meta)
    if not base or not Path(base).exists():
        raise CheckpointError(f"{p}: the base model {base!r} this LoRA checkpoint was trained on is not on disk")
    backbone = load_any_model(base, dtype=dtype, mesh=mesh)
    reward = meta.get("algorithm") == "rm"
    model = (RewardModel(backbone, ValueHead(backbone.config.hidden_size, rngs=nnx.Rngs(0)), **reward_head_kind(meta))
             if reward else backbone)
    add_lora(model, settings)
    params = nnx.state(model, trainable_filter(model))
    nnx.replace_by_pure_dict(params, restore_params(p, params, mesh))
    nnx.update(model, params)
    if reward and not value_head:
        return model.backbone
    return model


def _param_names(keys) -> tuple[str, ...]:
    """A saved leaf's path as parameter names (nnx Variables are saved as ``{"value": array}``)."""
    names = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
    return names[:-1] if names and names[-1] == "value" else names


def restore_params(path: Path, params: nnx.State, mesh=None) -> dict:
    """The ``params`` subtree of a checkpoint's train state as a pure dict shaped like ``params``
    (abstract), each array restored onto its sharding."""
    shardings = dict(nnx.to_flat_state(param_shardings(params, mesh))) if mesh is not None else None
    device = SingleDeviceSharding(jax.devices()[0])
    wanted = {tuple(str(k) for k in key): (key, var) for key, var in nnx.to_flat_state(params)}
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path.absolute() / "state").item_metadata.tree["params"]
    found = {}

    def target(keys, leaf):
        names = _param_names(keys)
        if names not in wanted:
            raise CheckpointError(f"{path}: parameter {'/'.join(names)} is not part of this model; the checkpoint "
                                  "and its meta do not match")
        key, var = wanted[names]
        if tuple(leaf.shape) != tuple(var.shape):
            raise CheckpointError(f"{path}: parameter {'/'.join(names)} has shape {tuple(leaf.shape)}, expected {var.shape}")
        found[names] = key
        sharding = device if shardings is None else shardings[key]
        return jax.ShapeDtypeStruct(var.shape, jnp.float32, sharding=sharding)

    item = jax.tree_util.tree_map_with_path(target, saved)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise CheckpointError(f"{path}: parameter {'/'.join(missing[0])} missing from the checkpoint")
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
    restored = checkpointer.restore(path.absolute() / "state", args=ocp.args.PyTreeRestore(
        item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))["params"]
    pure: dict = {}

    def collect(keys, value):
        node = pure
        key = found[_param_names(keys)]
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value

    jax.tree_util.tree_map_with_path(collect, restored)
    return pure


def read_model_type(path: str | Path) -> str | None:
    """The model_type of a Hugging Face folder or a jaxalign checkpoint (None when neither says; the model
    load reports what is wrong), read without loading weights: it picks the chat template."""
    p = Path(path)
    try:
        if is_checkpoint(p):
            return (read_meta(p).get("model_config") or {}).get("model_type")
        return json.loads((p / "config.json").read_text()).get("model_type")
    except Exception:  # unreadable: the model load that follows says why
        return None


def load_any_model(path: str | Path, *, dtype: str = "float32", mesh=None):
    """A Hugging Face folder or a jaxalign checkpoint folder, whichever ``path`` is."""
    if is_checkpoint(path):
        return load_checkpoint_model(path, dtype=dtype, mesh=mesh)
    return load_hf_model(path, dtype=dtype, mesh=mesh)
