"""The train state and the one compiled step every algorithm shares.

An algorithm supplies ``loss_fn(model, micro_batch, totals, extra) -> (loss, metrics)`` where
``loss`` and every metric are this micro-batch's *contribution* to the full-batch value (for a
token mean: the micro-batch's token sum divided by ``totals``' token count), so summing over
the gradient-accumulation micro-batches inside the step gives exact full-batch values.
``totals_fn(batch)`` computes those normalisers from the whole accumulated batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.models.lora import seed_dropout, trainable_filter
from jaxalign.parallel.rules import param_shardings


def _global_norm(tree) -> jax.Array:
    tree_ops = getattr(optax, "tree", None)
    if tree_ops is not None and hasattr(tree_ops, "norm"):
        return tree_ops.norm(tree)
    return optax.global_norm(tree)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


class CompileCounter:
    """Counts traces of a step function (each trace is one compilation per shape)."""

    def __init__(self):
        self.count = 0

    def tick(self):
        self.count += 1


def split_model(model: nnx.Module):
    """(graphdef, params, rest): params are what trains (every nnx.Param; under LoRA the adapters and any
    value head), rest the frozen remainder."""
    graphdef, params, rest = nnx.split(model, trainable_filter(model), ...)
    return graphdef, params, rest


def create_train_state(params, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int) -> TrainState:
    """A TrainState whose optimizer state is laid out like the (already sharded) params."""
    shardings = param_shardings(params, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    init = jax.jit(
        optimizer.init, in_shardings=(shardings,), out_shardings=optimizer_state_shardings(optimizer, params, mesh)
    )
    opt_state = init(params)
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), rep),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), rep),
    )


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params, mesh: Mesh):
    """Shardings for ``optimizer.init(params)``: every sub-tree shaped like the params (Adam's
    moments) is sharded like them, everything else (step counts) replicated on the mesh.
    Without them the state would land unsharded on one device, apart from the params."""
    return shardings_like_params(jax.eval_shape(optimizer.init, params), params, mesh)


def shardings_like_params(tree, params, mesh: Mesh):
    """Shardings for ``tree`` (arrays or shapes): each sub-tree shaped like ``params`` (optimizer moments, a
    reference copy) sharded like the params, everything else replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    params_def = jax.tree.structure(params)
    param_leaves = jax.tree.leaves(params)
    sharding_leaves = jax.tree.leaves(param_shardings(params, mesh))
    assert len(sharding_leaves) == len(param_leaves)
    shapes = [tuple(x.shape) for x in param_leaves]

    def like_params(node) -> bool:
        leaves, treedef = jax.tree.flatten(node)
        return treedef == params_def and [tuple(x.shape) for x in leaves] == shapes

    def assign(node):
        return jax.tree.unflatten(params_def, sharding_leaves) if like_params(node) else rep

    return jax.tree.map(assign, tree, is_leaf=like_params)


def state_shardings(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)


def abstract_train_state(params, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The TrainState :func:`create_train_state` makes, as shapes carrying their shardings (no memory):
    ``params`` are shapes or arrays, laid out by :func:`param_shardings`."""
    rep = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))

    def shaped(tree, shardings):  # ``shardings`` is a prefix of ``tree`` (one per variable)
        return jax.tree.map(lambda s, x: jax.tree.map(lambda y: jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=s), x),
                            shardings, tree)

    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=shaped(params, param_shardings(params, mesh)),
        opt_state=shaped(jax.eval_shape(optimizer.init, params), optimizer_state_shardings(optimizer, params, mesh)),
        rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
    )


def jit_train_step(step: Callable, state_sh, batch_sh, extra_sh, *more_sh):
    """``step(state, batch, extra, *more)`` jitted as the Trainer runs it: inputs laid out by the given
    shardings, the new state laid out like the old one, the old state donated."""
    return jax.jit(step, in_shardings=(state_sh, batch_sh, extra_sh, *more_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))


def accumulation_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays shaped [accum, micro_batch, ...]: the micro-batch axis over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), *([None] * (ndim - 2))))


def build_train_step(
    graphdef,
    rest,
    loss_fn: Callable,
    totals_fn: Callable,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    counter: CompileCounter | None = None,
):
    """``step(state, batch, extra) -> (state, metrics)``: gradient accumulation over the leading
    batch axis with ``lax.scan``, one optimizer update, float32 metrics. Not yet jitted."""

    def step(state: TrainState, batch: dict, extra: Any):
        if counter is not None:
            counter.tick()
        totals = totals_fn(batch)
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro_loss(params, micro, rng):
            model = nnx.merge(graphdef, params, rest)
            seed_dropout(model, jax.random.fold_in(rng, 0x4C6F5241))  # "LoRA": apart from the loss rng
            return loss_fn(model, micro, totals, extra, rng)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        first = jax.tree.map(lambda x: x[0], batch)
        _, metric_shapes = jax.eval_shape(micro_loss, state.params, first, step_rng)
        zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
        zeros_grads = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry, xs):
            grads_acc, loss_acc, metrics_acc = carry
            micro, i = xs
            (loss, metrics), grads = grad_fn(state.params, micro, jax.random.fold_in(step_rng, i))
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(lambda a, m: a + m.astype(jnp.float32), metrics_acc, metrics)
            return (grads_acc, loss_acc + loss, metrics_acc), None

        n_micro = jax.tree.leaves(batch)[0].shape[0]
        (grads, loss, metrics), _ = jax.lax.scan(
            body, (zeros_grads, jnp.zeros((), jnp.float32), zeros_metrics), (batch, jnp.arange(n_micro))
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = _global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step


def build_eval_step(graphdef, rest, loss_fn: Callable, totals_fn: Callable):
    """``eval_step(params, batch, extra) -> metrics`` (loss and metrics, no update). Not yet jitted."""

    def eval_step(params, batch, extra):
        totals = totals_fn(batch)

        def one(micro):
            model = nnx.merge(graphdef, params, rest)
            loss, metrics = loss_fn(model, micro, totals, extra, jax.random.key(0))
            return {**metrics, "loss": loss}

        per_micro = jax.lax.map(one, batch)
        return jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32), axis=0), per_micro)

    return eval_step
