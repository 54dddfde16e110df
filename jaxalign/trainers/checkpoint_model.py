"""Rebuild the trained model from a jaxalign checkpoint folder (for export, infer and chaining stages)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxalign.convert.hf_load import abstract_model
from jaxalign.errors import CheckpointError
from jaxalign.models.config import config_from_hf
from jaxalign.trainers.checkpoint import read_meta


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "meta").exists() and (p / "state").exists()


def is_reward_checkpoint(path: str | Path) -> bool:
    """A checkpoint of ``--rlhf_type rm`` (a backbone plus a value head)."""
    return is_checkpoint(path) and read_meta(Path(path)).get("algorithm") == "rm"


def load_checkpoint_model(path: str | Path, *, dtype: str = "float32", value_head: bool = False):
    """The policy saved in ``output_dir/checkpoint-N`` as a Decoder (params on the default device).

    A reward-model checkpoint gives its backbone, or with ``value_head=True`` the whole
    :class:`jaxalign.models.value_head.RewardModel`."""
    p = Path(path)
    if not is_checkpoint(p):
        raise CheckpointError(f"{p}: not a jaxalign checkpoint folder (expected state/ and meta/ inside)")
    meta = read_meta(p)
    import dataclasses

    config = config_from_hf(meta["model_config"], source=f"{p}/meta")
    if meta.get("generation_config"):
        config = dataclasses.replace(config, generation_config=meta["generation_config"])
    reward = meta.get("algorithm") == "rm"
    if reward:
        from jaxalign.models.value_head import RewardModel, ValueHead

        head = nnx.eval_shape(lambda: ValueHead(config.hidden_size, rngs=nnx.Rngs(0)))
        abstract = RewardModel(abstract_model(config, dtype), head)
    else:
        abstract = abstract_model(config, dtype)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = ckptr.restore(p.absolute(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    saved = restored["state"]["params"]
    flat = nnx.to_flat_state(params)
    values = {}
    for path_, var in flat:
        node = saved
        try:
            for k in path_:
                node = node[str(k)] if str(k) in node else node[k]
            if isinstance(node, dict) and "value" in node:  # nnx Variables are saved as {"value": array}
                node = node["value"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{p}: parameter {'/'.join(map(str, path_))} missing from the checkpoint") from None
        if tuple(node.shape) != tuple(var.shape):
            raise CheckpointError(f"{p}: parameter {'/'.join(map(str, path_))} has shape {node.shape}, expected {var.shape}")
        values[path_] = jnp.asarray(jax.device_get(node), jnp.float32)
    pure = {}
    for path_, v in values.items():
        d = pure
        for k in path_[:-1]:
            d = d.setdefault(k, {})
        d[path_[-1]] = v
    nnx.replace_by_pure_dict(params, pure)
    model = nnx.merge(graphdef, params, rest)
    if reward and not value_head:
        return model.backbone
    return model


def load_any_model(path: str | Path, *, dtype: str = "float32", mesh=None):
    """A Hugging Face folder or a jaxalign checkpoint folder, whichever ``path`` is."""
    if is_checkpoint(path):
        model = load_checkpoint_model(path, dtype=dtype)
        if mesh is not None:
            from jaxalign.parallel.rules import param_shardings

            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            params = jax.device_put(params, param_shardings(params, mesh))
            model = nnx.merge(graphdef, params, rest)
        return model
    from jaxalign.convert import load_hf_model

    return load_hf_model(path, dtype=dtype, mesh=mesh)
