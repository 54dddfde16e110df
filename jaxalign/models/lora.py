"""LoRA adapters on the decoder's linear layers (``--tuner_type lora``), as PEFT defines them.

An adapted :class:`jaxalign.models.decoder.Linear` computes ``x @ W + scaling * dropout(x) @ A @ B``
with ``A`` [in, r], ``B`` [r, out] (PEFT stores the transposes) and ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). The adapter matrices are :class:`LoRAParam` variables, so
``nnx.split(model, LoRAParam, ...)`` separates what trains from the frozen base; zeroing them
gives the base model exactly (``x + 0``), which is how the reference model is "adapters off".
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.parallel.activations import gather_weight

# The decoder's linear layers, as PEFT and ms-swift name them; "all-linear" means all of them.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Variable):
    """An adapter matrix: trained under LoRA, absent from the base model's Hugging Face tensors."""


class DropoutKey(nnx.Variable):
    """The random key of one adapter's dropout, set for a training forward only."""


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LINEAR_MODULES
    use_rslora: bool = False
    init_lora_weights: bool = True

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_target_modules(value) -> tuple[str, ...]:
    """``all-linear`` or a comma/space separated list of module names -> the module names, checked."""
    if isinstance(value, (list, tuple)):
        names = [str(v) for v in value]
    else:
        names = str(value or "all-linear").replace(",", " ").split()
    if not names or names == ["all-linear"] or names == ["all_linear"]:
        return LINEAR_MODULES
    unknown = [n for n in names if n not in LINEAR_MODULES]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a linear module of the decoder; choose all-linear or from "
                         + ", ".join(LINEAR_MODULES))
    return tuple(n for n in LINEAR_MODULES if n in names)


class LoRA(nnx.Module):
    """``scaling * dropout(x) @ a @ b`` for x [N, in]; ``a`` [in, r], ``b`` [r, out], float32 masters.

    On the decoder's stacked (scanned) layers ``lead`` is ``(layers,)``: ``a`` [L, in, r] and ``b`` [L, r, out],
    and the layer scan hands each layer its own slice."""

    def __init__(self, d_in: int, d_out: int, axes: tuple, settings: LoRASettings, *, rngs: nnx.Rngs,
                 lead: tuple[int, ...] = ()):
        r = settings.rank
        lead_axes, axes = tuple(axes[: len(lead)]), tuple(axes[len(lead):])
        # PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0, so step 0 is the base.
        bound_a = d_in**-0.5
        self.a = LoRAParam(jax.random.uniform(rngs.params(), (*lead, d_in, r), jnp.float32, -bound_a, bound_a),
                           axes=(*lead_axes, axes[0], None))
        if settings.init_lora_weights:
            b = jnp.zeros((*lead, r, d_out), jnp.float32)
        else:
            b = jax.random.uniform(rngs.params(), (*lead, r, d_out), jnp.float32, -(r**-0.5), r**-0.5)
        self.b = LoRAParam(b, axes=(*lead_axes, None, axes[1]))
        self.scaling = float(settings.scaling)
        self.dropout = float(settings.dropout)
        self.dropout_key = nnx.data(None)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        if self.dropout > 0.0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        # Under a mesh the adapters are gathered over fsdp before use, like the kernel (parallel.activations).
        a = gather_weight(self.a[...].astype(dtype), self.a.get_metadata().get("axes"))
        b = gather_weight(self.b[...].astype(dtype), self.b.get_metadata().get("axes"))
        h = jnp.dot(x.astype(dtype), a)
        return jnp.dot(h, b) * jnp.asarray(self.scaling, dtype)


def _linears(model: nnx.Module):
    """(path, Linear) for every adaptable linear layer in ``model`` (any decoder inside it)."""
    from jaxalign.models.decoder import Linear  # the decoder imports this module

    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and path and path[-1] in LINEAR_MODULES:
            yield path, node


def add_lora(model: nnx.Module, settings: LoRASettings, *, seed: int = 0) -> int:
    """Attach fresh adapters to every target linear layer of every decoder in ``model`` (in place), each
    sharded like its layer when the layer's kernel is; returns how many layers were adapted."""
    rngs = nnx.Rngs(seed)
    count = 0
    for path, linear in _linears(model):
        if path[-1] not in settings.target_modules:
            continue
        kernel = linear.kernel
        *lead, d_in, d_out = kernel.shape
        axes = tuple(kernel.get_metadata().get("axes") or (None,) * kernel.ndim)
        lora = LoRA(d_in, d_out, axes, settings, rngs=rngs, lead=tuple(lead))
        sharding = getattr(kernel[...], "sharding", None)
        if sharding is not None and hasattr(sharding, "mesh"):
            from jaxalign.parallel.rules import param_shardings

            state = nnx.state(lora, LoRAParam)
            nnx.update(lora, jax.device_put(state, param_shardings(state, sharding.mesh)))
        linear.lora = lora
        count += 1
    return count


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(node, LoRA) for _, node in nnx.iter_graph(model))


def lora_modules(model: nnx.Module) -> dict[tuple, "LoRA"]:
    """The adapters in ``model`` by the path of their linear layer."""
    return {path: linear.lora for path, linear in _linears(model) if linear.lora is not None}


def seed_dropout(model: nnx.Module, rng: jax.Array) -> None:
    """Give every adapter with dropout its own key for this forward (a training step's); models without
    one (the reference, the sampler, evaluation) run without dropout."""
    for i, (_, node) in enumerate(nnx.iter_graph(model)):
        if isinstance(node, LoRA) and node.dropout > 0.0:
            key = jax.random.fold_in(rng, i)
            lead = node.a.shape[:-2]  # stacked layers: one key per layer
            keys = jax.random.split(key, lead) if lead else key
            node.dropout_key = DropoutKey(jax.random.key_data(keys))


def adapters_off(params):
    """``params`` (a split state) with every adapter matrix zeroed: merged with the frozen base it is the
    base model exactly. Other trainable leaves (a reward model's head) are copied."""

    def one(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return jnp.zeros_like(leaf) if "lora" in names else jnp.copy(leaf)

    return jax.tree_util.tree_map_with_path(one, params)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (``W + scaling * A @ B`` in float32) and remove it, in place."""
    for _, linear in _linears(model):
        lora = linear.lora
        if lora is None:
            continue
        delta = jnp.matmul(lora.a[...].astype(jnp.float32), lora.b[...].astype(jnp.float32)) * lora.scaling
        kernel = linear.kernel[...]
        linear.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        linear.lora = None
    return model


def trainable_filter(model: nnx.Module):
    """What trains: everything (``nnx.Param``) in full fine-tuning; under LoRA the adapters plus any value
    head (ms-swift's ``modules_to_save`` for reward and value models)."""
    if not has_lora(model):
        return nnx.Param
    return nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.PathContains("v_head")))


def cast_frozen(rest, dtype) -> object:
    """The frozen base held in ``dtype`` (bfloat16 halves it); adapters and their optimizer state stay float32."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return rest

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):  # an abstract model (`jaxalign plan`)
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, rest)


def trainable_summary(params, rest) -> str:
    """ms-swift's line: trainable parameters of all, and the share."""
    n_train = sum(int(x.size) for x in jax.tree.leaves(params))
    n_all = n_train + sum(int(x.size) for x in jax.tree.leaves(rest))
    return f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%: {100.0 * n_train / max(n_all, 1):.4f}"
