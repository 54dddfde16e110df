"""Sharding constraints on activations and on weights at their point of use (true FSDP).

Activations carry logical axis names, as MaxText's do (``activation_batch``, ``activation_length``,
``activation_embed``, ``activation_heads``, ...), mapped onto the mesh by :data:`ACTIVATION_RULES`:
the batch over (data, fsdp), the wide dimensions over tensor, the rest replicated. :func:`constrain`
pins an activation to that layout and :func:`gather_weight` all-gathers a weight over fsdp just
before its matmul (the backward reduce-scatters its gradient), so every chip computes on its own
rows of the batch and never on the global batch.

Both read the mesh from the context (``with jax.set_mesh(mesh)`` around the jitted call, see
:func:`mesh_context`) and do nothing without one, or on a one-device mesh. A dimension the mapped
mesh axes do not divide is replicated (``logical_to_spec``), so a batch of 1 still runs on 8 devices.
"""

from __future__ import annotations

import contextlib
import functools

import jax
from jax.sharding import PartitionSpec

from jaxalign.parallel.rules import DEFAULT_RULES, logical_to_spec

# Logical activation axes -> mesh axes.
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "activation_batch": ("data", "fsdp"),
    # Replicated today; context parallelism maps it to a 'sequence' mesh axis (ring attention needed).
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
    "activation_head_dim": None,
}

# Mesh axes that shard parameters but not their use: gathered before each matmul.
FSDP_AXES = ("fsdp",)

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, KV_HEADS, MLP, VOCAB, HEAD_DIM = (
    "activation_heads", "activation_kv_heads", "activation_mlp", "activation_vocab", "activation_head_dim")


def context_mesh():
    """The mesh of the enclosing ``jax.set_mesh`` (an AbstractMesh while tracing), or None when there
    is none or it has a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size <= 1:
        return None
    return mesh


def mesh_context(mesh):
    """``jax.set_mesh(mesh)``, or a no-op for ``mesh=None``: wrap the call (trace) of a jitted model
    function in it so the constraints of this module take effect (and attention sees the platform and
    mesh it compiles for, see models/attention.py)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def activation_spec(axes, shape, mesh, rules=None) -> PartitionSpec:
    """The PartitionSpec of an activation whose dimensions are named ``axes``."""
    return logical_to_spec(axes, shape, mesh, ACTIVATION_RULES if rules is None else rules)


def constrain(x: jax.Array, axes: tuple[str | None, ...], rules=None) -> jax.Array:
    """``x`` pinned to the sharding its logical ``axes`` name under the context mesh (no-op without one)."""
    mesh = context_mesh()
    if mesh is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} axis names {axes} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, activation_spec(axes, x.shape, mesh, rules))


def features(x: jax.Array, feature: str) -> tuple[str, ...]:
    """Axis names of a [batch, (length,) ..., feature] activation: batch first, feature last."""
    return (BATCH,) + (LENGTH,) * (x.ndim - 2) + (feature,)


def activation_axis(param_axis: str | None) -> str | None:
    """The activation axis a weight dimension produces: ``heads`` -> ``activation_heads``."""
    return None if param_axis is None else f"activation_{param_axis}"


def _without_fsdp(rules):
    out = {}
    for name, target in rules.items():
        if target is None:
            out[name] = None
            continue
        kept = tuple(a for a in ((target,) if isinstance(target, str) else target) if a not in FSDP_AXES)
        out[name] = kept or None
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(w, gathered: PartitionSpec, stored: PartitionSpec):
    return jax.lax.with_sharding_constraint(w, gathered)


def _gather_fwd(w, gathered, stored):
    return _gather(w, gathered, stored), None


def _gather_bwd(gathered, stored, _, g):
    # The weight gradient leaves sharded as the weight is stored: a reduce-scatter of the partial sums.
    return (jax.lax.with_sharding_constraint(g, stored),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_weight(w: jax.Array, axes: tuple[str | None, ...] | None, rules=None) -> jax.Array:
    """A weight (already cast to the compute dtype) all-gathered over the fsdp axes, still split over
    tensor; its gradient is reduce-scattered back to the stored sharding. No-op without a mesh."""
    mesh = context_mesh()
    if mesh is None or axes is None:
        return w
    axes = tuple(axes)[-w.ndim:]  # a scanned layer's slice: its variables' axes still name the "layers" axis
    rules = DEFAULT_RULES if rules is None else rules
    stored = logical_to_spec(axes, w.shape, mesh, rules)
    gathered = logical_to_spec(axes, w.shape, mesh, _without_fsdp(rules))
    if stored == gathered:
        return w
    return _gather(w, gathered, stored)


def embedding_lookup(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """``table[ids]`` in ``dtype`` for a [vocab, embed] table stored sharded over (tensor, fsdp) and ids
    sharded over the batch, without gathering the table or the global batch's activations: each fsdp
    group looks its rows up in its own slice of the embedding dimension, and an all-to-all over fsdp
    hands every device its own rows in full. The result is [batch, length, embed], batch-sharded."""
    mesh = context_mesh()
    if mesh is None:
        return table[ids].astype(dtype)
    batch = ACTIVATION_RULES[BATCH]
    batch = tuple(a for a in ((batch,) if isinstance(batch, str) else batch or ()) if a not in FSDP_AXES)
    by_column = {**ACTIVATION_RULES, BATCH: batch or None, EMBED: FSDP_AXES}
    axes = (BATCH,) + (LENGTH,) * (ids.ndim - 1)
    rows = table[constrain(ids, axes, by_column)].astype(dtype)
    rows = constrain(rows, axes + (EMBED,), by_column)
    return constrain(rows, axes + (EMBED,))
