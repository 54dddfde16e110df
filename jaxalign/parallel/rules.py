"""Logical axis names -> mesh axes, and the shardings that follow for parameters and batches."""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Parameters: the model dimension is split over fsdp, the wide dimensions over tensor.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # the scanned layers' stacking axis: every chip holds its slice of every layer
}


def logical_to_spec(axes, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """The PartitionSpec for an array of ``shape`` whose dimensions are named ``axes``.

    A dimension that the mapped mesh axes do not divide is replicated instead, so tiny
    models still run on large meshes; a mesh axis is used at most once per array.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
        if not names or size % math.prod(mesh.shape[n] for n in names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """A pytree like ``state`` (a split nnx State) with a NamedSharding per variable."""

    def one(var):
        axes = var.get_metadata().get("axes") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays: the leading dimension over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
