"""A run's compiled programs from shapes alone: the train step (and the sampler of GRPO/PPO) as the
Trainer builds them, lowered with abstract arguments for a mesh over a topology's devices.

Nothing here allocates a weight. The module is built with ``nnx.eval_shape``; the Trainer's own
pieces (:func:`split_for_training`, :func:`batch_geometry`, :func:`build_optimizer`,
:func:`build_train_step`, :func:`jit_train_step`, the algorithm's ``rows_per_batch``/``setup``/
``loss_fn``, the collate functions, :func:`sampler_call`) then run on a :class:`PlannedRun`, a
stand-in for the Trainer that holds shapes where the Trainer holds arrays and no data.

One difference from a training run: the Trainer closes the frozen part of the module (``rest``;
under LoRA the base model) over its step as a constant; here it is a non-donated argument with the
same sharding, so it is counted in the argument bytes. It is resident on the chips either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.algorithms import make_algorithm
from jaxalign.data.batching import make_buckets, parse_buckets, stack_micro_batches
from jaxalign.data.collate import collate
from jaxalign.data.encode import KTOExample, PairExample, SFTExample
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models.config import ModelConfig, config_from_hf
from jaxalign.models.decoder import Decoder
from jaxalign.models.value_head import new_reward_model
from jaxalign.parallel import make_mesh
from jaxalign.parallel.rules import batch_sharding, param_shardings
from jaxalign.rollout.generate import sampler_call
from jaxalign.trainers.optim import build_optimizer
from jaxalign.trainers.step import (
    abstract_train_state,
    accumulation_sharding,
    build_train_step,
    jit_train_step,
    shardings_like_params,
)
from jaxalign.trainers.trainer import batch_geometry, split_for_training
from jaxalign.trainers.tuner import apply_tuner


# ----- the model -------------------------------------------------------------------------------
def read_model_config(path: str, *, num_layers: int | None = None, what: str = "--model") -> ModelConfig:
    """The ModelConfig of a Hugging Face folder or a bare config.json (``num_layers`` overrides the depth)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        where = f"{p}: no config.json" if p.is_dir() else f"{p}: no such model folder or config.json"
        raise CheckpointError(f"{what} {where}; pass a Hugging Face model folder or its config.json")
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); restore the file") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object (a model's config.json)")
    if num_layers is not None:
        raw = dict(raw, num_hidden_layers=int(num_layers))
        if isinstance(raw.get("layer_types"), list):
            raw["layer_types"] = raw["layer_types"][:num_layers]
        if "max_window_layers" in raw:
            raw["max_window_layers"] = min(int(raw["max_window_layers"]), num_layers)
    config = config_from_hf(raw, source=str(file))
    gen = file.parent / "generation_config.json"
    if gen.is_file():
        with contextlib.suppress(ValueError):
            config = dataclasses.replace(config, generation_config=json.loads(gen.read_text()))
    return config


def abstract_module(cfg, algorithm, config: ModelConfig, value_config: ModelConfig | None = None) -> nnx.Module:
    """The module the Trainer would train, as shapes: the decoder (RM: with a value head; PPO: policy and
    value model), with adapters under ``--tuner_type lora`` (:func:`apply_tuner`)."""
    from jaxalign.trainers.ppo_step import PolicyAndValue

    dtype = jnp.dtype(cfg.torch_dtype)

    def build():
        module = Decoder(config, dtype=dtype, rngs=nnx.Rngs(0))
        if algorithm.name == "rm":
            module = new_reward_model(module, seed=int(cfg.seed))
        elif algorithm.name == "ppo":
            value = Decoder(value_config or config, dtype=dtype, rngs=nnx.Rngs(1))
            module = PolicyAndValue(module, new_reward_model(value, seed=int(cfg.seed)))
        return apply_tuner(cfg, algorithm, module)

    return nnx.eval_shape(build)


def shaped(tree, shardings):
    """``tree``'s leaves as ShapeDtypeStructs carrying ``shardings`` (a tree of the same structure, or a prefix
    of it: one sharding per nnx variable)."""
    return jax.tree.map(lambda s, x: jax.tree.map(lambda y: jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=s), x),
                        shardings, tree)


class PlannedRun:
    """What an algorithm's ``rows_per_batch`` and ``setup`` read from a :class:`Trainer`, with shapes
    (carrying shardings) where the Trainer holds arrays, and no data, tokenizer or output."""

    main_process = False
    tokenizer = None

    def __init__(self, cfg, algorithm, module: nnx.Module, mesh):
        self.cfg, self.algo, self.mesh = cfg, algorithm, mesh
        self.model_config = module.config
        self.pad_id = module.config.pad_token_id or 0
        self.out = Path(cfg.output_dir)
        self.data = SimpleNamespace(train=[], val=[])
        self.batches = SimpleNamespace(examples=[])
        self.graphdef, params, rest = split_for_training(module, cfg, algorithm, mesh)
        self.rest = shaped(rest, param_shardings(rest, mesh))
        self.data_parallel, self.micro_batch, self.accum = batch_geometry(cfg, algorithm, mesh)
        self.eval_batch = cfg.per_device_eval_batch_size * self.data_parallel
        self.buckets = make_buckets(cfg.max_length, buckets=parse_buckets(cfg.length_buckets))
        self.total_steps = int(cfg.max_steps) if cfg.max_steps and cfg.max_steps > 0 else 1000
        self.optimizer, self.schedule = build_optimizer(cfg, algorithm.optimizer_steps(self.total_steps))
        self.state = abstract_train_state(params, self.optimizer, mesh)

    def add_hook(self, *args, **kwargs) -> None:  # evaluation and sample logging: not part of a plan
        pass

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params, self.rest)

    def policy(self) -> nnx.Module:
        return self.algo.policy(self.model())


def setup_algorithm(run: PlannedRun, algorithm):
    """``algorithm.setup(run)`` traced with the params and frozen rest as abstract values (a reference copy
    of the params costs nothing), returning ``algorithm.extra()`` as shapes with the Trainer's shardings and
    the traced ``rest`` object the algorithm kept (rebound to the step's own in :func:`rebound`)."""
    kept = {}

    def fn(params, rest):
        saved = run.state, run.rest
        run.state, run.rest = run.state.replace(params=params), rest
        try:
            algorithm.setup(run)
            kept["rest"] = rest
            return algorithm.extra()
        finally:
            run.state, run.rest = saved

    extra = jax.eval_shape(fn, run.state.params, run.rest)
    extra = shaped(extra, shardings_like_params(extra, run.state.params, run.mesh))
    return extra, kept["rest"]


@contextlib.contextmanager
def rebound(obj, old, new, depth: int = 2):
    """Within the block, every attribute of ``obj`` (and of jaxalign objects it holds, ``depth`` deep) that
    is ``old`` is ``new``: the algorithm's copy of the frozen rest, set by ``setup``, becomes the traced
    argument of the step being compiled."""
    changed = []

    def walk(o, d):
        for key, value in list(vars(o).items()):
            if value is old:
                changed.append((o, key))
                setattr(o, key, new)
            elif d > 0 and hasattr(value, "__dict__") and type(value).__module__.startswith("jaxalign"):
                walk(value, d - 1)

    walk(obj, depth)
    try:
        yield
    finally:
        for o, key in changed:
            setattr(o, key, old)


# ----- the batch --------------------------------------------------------------------------------
def _one_row(kind: str, cfg):
    """A one-token example of the data kind (collate pads it to the bucket)."""
    one = np.ones((1,), np.int32)
    if kind == "sft":
        return SFTExample(input_ids=one, loss_mask=one.astype(np.int8))
    if kind == "pair":
        ref = 0.0 if cfg.get("precompute_ref_log_probs") else None
        return PairExample(chosen_ids=one, chosen_mask=one.astype(np.int8), rejected_ids=one,
                           rejected_mask=one.astype(np.int8), ref_chosen_logps=ref, ref_rejected_logps=ref)
    if kind == "kto":
        return KTOExample(prompt_ids=one, completion_ids=one, label=True)
    raise ValueError(kind)


def step_batch(run: PlannedRun, algorithm, length: int) -> dict[str, np.ndarray]:
    """One optimizer step's stacked batch [accum, micro_batch, ...] as the Trainer feeds it, every sequence
    padded to ``length``: collated from the data kind's rows (offline algorithms), or a generation's update
    arrays (GRPO, PPO: prompts of ``length`` tokens plus ``max_completion_length`` sampled ones)."""
    cfg, kind = run.cfg, algorithm.spec.data_kind
    if kind != "prompt":
        micro = collate([_one_row(kind, cfg)] * run.micro_batch, length, run.pad_id)
        return stack_micro_batches([micro] * run.accum, run.pad_id)
    c = int(cfg.max_completion_length)
    if algorithm.name == "grpo":
        from jaxalign.trainers.grpo import update_arrays

        rows, prompts = algorithm.generation_batch, algorithm.prompts_per_generation
        roll = {"tokens": np.zeros((rows, c), np.int32), "mask": np.ones((rows, c), np.int32),
                "logps": np.zeros((rows, c), np.float32), "finished": np.ones((rows,), bool)}
        arrays = update_arrays(np.zeros((prompts, length), np.int32), np.ones((prompts, length), np.int32), roll,
                               np.zeros((rows,), np.float32), num_generations=algorithm.G,
                               overlong_filter=cfg.overlong_filter, pack=algorithm.pack)
    else:
        from jaxalign.trainers.ppo import update_arrays

        rows = run.micro_batch
        per_token = np.zeros((rows, c), np.float32)
        arrays = update_arrays(np.zeros((rows, length + c), np.int32), np.ones((rows, length + c), np.int32),
                               np.ones((rows, c), np.float32), per_token, per_token, per_token, per_token)
    micro = {k: v[: len(v) * run.micro_batch // rows] for k, v in arrays.items()}  # packed rows keep their ratio
    return stack_micro_batches([micro] * run.accum, run.pad_id)


# ----- bytes ------------------------------------------------------------------------------------
def device_bytes(tree) -> int:
    """Bytes one device holds of ``tree``'s leaves (ShapeDtypeStructs carrying shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        try:
            itemsize = jnp.dtype(x.dtype).itemsize
        except TypeError:  # a typed PRNG key
            itemsize = math.prod(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape) * 4
        total += math.prod(shape) * itemsize
    return int(total)


def global_count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----- model FLOPs (the 6ND convention) -----------------------------------------------------------
def layer_matmul_params(c: ModelConfig) -> int:
    """Weights used in matmuls by the decoder layers (attention projections and the MLP)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return c.num_hidden_layers * (c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)


def forward_flops(c: ModelConfig, tokens: int, context: int, head_tokens: int) -> float:
    """Forward FLOPs of ``tokens`` tokens through the layers, each attending over ``context`` positions
    (4 * layers * heads * head_dim * context per token: scores and values), with the LM head applied to
    ``head_tokens`` of them (PaLM's appendix B counting, without the causal halving)."""
    attn = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context
    return 2.0 * layer_matmul_params(c) * tokens + attn * tokens + 2.0 * c.hidden_size * c.vocab_size * head_tokens


# ----- the programs -----------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
    """A lowered program and what it was built from."""

    name: str
    lowered: object
    parts: dict[str, int]  # per-device bytes of its arguments, by role
    resident_elsewhere: dict[str, int]  # per-device bytes held on the chips while it runs, not its arguments
    model_flops: float  # over all devices, the 6ND convention
    notes: list[str]
    lower_seconds: float = 0.0


@dataclasses.dataclass
class Plan:
    cfg: object
    config: ModelConfig
    mesh: object
    algorithm: object
    run: PlannedRun
    programs: list[Program]
    facts: dict


def build_plan(cfg, devices, *, num_layers: int | None = None) -> Plan:
    """Lower the run's train step (and for GRPO/PPO its sampler) for a mesh over ``devices``."""
    for key in ("adapters", "ref_adapters"):
        if cfg.get(key):
            raise ConfigError(f"--{key}: plan builds fresh adapters; give the adapter's --lora_rank and "
                              "--target_modules instead")
    if not cfg.model:
        raise ConfigError("--model is required: a Hugging Face model folder or its config.json")
    config = read_model_config(cfg.model, num_layers=num_layers)
    algorithm = make_algorithm(cfg)
    value_config = None
    if algorithm.name == "ppo":
        if not cfg.get("reward_model") and not cfg.get("value_model"):
            raise ConfigError("--reward_model is required for ppo: a reward-model folder (or its config.json), "
                              "whose shape the value model and the reward model take")
        value_config = read_model_config(cfg.value_model or cfg.reward_model, num_layers=num_layers,
                                         what="--value_model" if cfg.value_model else "--reward_model")
    mesh = make_mesh(cfg.mesh, devices=devices)
    module = abstract_module(cfg, algorithm, config, value_config)
    if algorithm.name == "ppo":  # what PPO.prepare_model sets: the separate reference (full) and reward model
        algorithm.ref_graphdef = None if algorithm.lora is not None else nnx.graphdef(module.policy)
        algorithm.memory = {}
    run = PlannedRun(cfg, algorithm, module, mesh)
    algorithm.rows_per_batch(run)
    extra, setup_rest = setup_algorithm(run, algorithm)
    length = run.buckets[-1]

    # The train step, as Trainer.train_step jits it (the frozen rest an argument here, see the module doc).
    batch = step_batch(run, algorithm, length)
    batch_sh = {k: accumulation_sharding(mesh, v.ndim) for k, v in batch.items()}
    batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
    state_sh = jax.tree.map(lambda x: x.sharding, run.state)
    rest_sh = jax.tree.map(lambda x: x.sharding, run.rest)

    def step(state, batch, extra, rest):
        with rebound(algorithm, setup_rest, rest):
            fn = build_train_step(run.graphdef, rest, algorithm.loss_fn, algorithm.totals_fn, run.optimizer,
                                  run.schedule)
            return fn(state, batch, extra)

    jitted = jit_train_step(step, state_sh, batch_sh, jax.tree.map(lambda x: x.sharding, extra), rest_sh)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # as the Trainer's entry points trace: sharding constraints may name mesh axes
        lowered = jitted.lower(run.state, batch_abs, extra, run.rest)
    lower_s = time.perf_counter() - t0
    st = run.state
    parts = {"params": device_bytes(st.params), "optimizer": device_bytes(st.opt_state),
             "step+rng": device_bytes((st.step, st.rng)), "reference": device_bytes(extra),
             "frozen": device_bytes(run.rest), "batch": device_bytes(batch_abs)}
    elsewhere = {}
    if algorithm.name == "ppo":  # the separate reward model (and, full, reference), frozen float32 params
        policy_params = device_bytes(nnx.state(nnx.merge(run.graphdef, st.params, run.rest).policy, nnx.Param))
        elsewhere["reward model"] = device_bytes(_reward_model_params(value_config, cfg, mesh))
        if algorithm.lora is None:
            elsewhere["reference"] = policy_params
    tokens = sum(int(v.size) for k, v in batch.items() if k.endswith("input_ids") or k == "query_responses")
    rows = sum(int(v.shape[0] * v.shape[1]) for k, v in batch.items()
               if k.endswith("input_ids") or k == "query_responses")
    seq = tokens // max(rows, 1)
    completions = rows
    if algorithm.name == "grpo":  # shared-prefix rows hold a prompt and k completions; each completion sees
        completions = int(batch["completion_mask"].shape[0] * batch["completion_mask"].shape[1])
        seq = length + int(cfg.max_completion_length)  # its prompt and itself, as in a sequence of its own
    train_flops = _update_model_flops(algorithm, config, value_config, tokens, completions, seq, cfg, extra)
    what = ("the largest length bucket" if algorithm.spec.data_kind != "prompt" else
            f"prompts padded to the largest length bucket, {length}, + {cfg.max_completion_length} sampled")
    notes = [f"batch: {run.accum} x {run.micro_batch} rows of {seq} tokens ({what})"]
    if algorithm.name == "grpo" and algorithm.pack > 1:
        notes.append(f"shared-prefix rows: each prompt once with {algorithm.pack} of its completions, "
                     f"{rows // run.accum} rows of {tokens // rows} tokens per step")
    programs = [Program("train step", lowered, parts, elsewhere, train_flops, notes, lower_s)]

    facts = {
        "layers": config.num_hidden_layers, "trainable_params": global_count(st.params),
        "frozen_params": global_count(run.rest), "mesh": dict(mesh.shape), "micro_batch": run.micro_batch,
        "gradient_accumulation_steps": run.accum, "sequence_length": seq,
    }
    if algorithm.spec.data_kind == "prompt":
        programs.append(_sampler_program(run, algorithm, length, parts, elsewhere))
    return Plan(cfg, config, mesh, algorithm, run, programs, facts)


def _reward_model_params(config, cfg, mesh):
    """PPO's frozen reward model (backbone and head), float32 params as it is loaded, on the mesh."""
    model = nnx.eval_shape(lambda: new_reward_model(Decoder(config, dtype=jnp.dtype(cfg.torch_dtype),
                                                            rngs=nnx.Rngs(0))))
    params = nnx.state(model, nnx.Param)
    return shaped(params, param_shardings(params, mesh))


def _update_model_flops(algorithm, c, value_c, tokens, rows, seq, cfg, extra) -> float:
    """Model FLOPs of one optimizer step: forward + backward of what trains (6ND; under LoRA 4ND, no
    weight gradients of the frozen base), plus a forward of the in-step reference when there is one."""
    train_mult = 2.0 if algorithm.lora is not None else 3.0  # (forward + backward) / forward
    if algorithm.spec.data_kind == "prompt":  # the LM head only over the completion positions (rows: completions)
        head = rows * int(cfg.max_completion_length)
    elif algorithm.name == "rm":
        head = 0
    else:
        head = tokens
    fwd = forward_flops(c, tokens, seq, head)
    flops = train_mult * fwd
    if algorithm.name == "ppo":
        flops += train_mult * forward_flops(value_c, tokens, seq, 0)
    if jax.tree.leaves(extra) and global_count(extra) > 1:  # a params-shaped reference, run forward
        flops += fwd
    return flops


def _sampler_program(run: PlannedRun, algorithm, length: int, train_parts: dict, train_elsewhere: dict) -> Program:
    """The rollout sampler as :meth:`RolloutAlgorithm.sample` runs it, for one generation's prompts."""
    mesh, cfg, c = run.mesh, run.cfg, run.model_config
    n = algorithm.G if algorithm.name == "grpo" else 1
    prompts = algorithm.prompts_per_generation if algorithm.name == "grpo" else algorithm.rollout_batch
    policy = run.policy()
    graphdef, state = nnx.split(policy)
    options = algorithm.sampling(run, n=n)
    options.pop("mesh")
    fn, stops = sampler_call(graphdef, policy.config, prompts, mesh=mesh, **options)
    rows_sh = batch_sharding(mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        shaped(state, param_shardings(state, mesh)),
        jax.ShapeDtypeStruct((prompts, length), jnp.int32, sharding=rows_sh),
        jax.ShapeDtypeStruct((prompts, length), jnp.int32, sharding=rows_sh),
        jax.ShapeDtypeStruct(stops.shape, jnp.int32, sharding=rows_sh),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.lower(*args)
    lower_s = time.perf_counter() - t0
    policy_bytes = device_bytes(args[0])
    parts = {"policy": policy_bytes, "prompts": device_bytes(args[1:4]), "rng": device_bytes(args[4])}
    # The train state stays on the chips while sampling; the policy's weights are the sampler's argument.
    held = sum(train_parts.values()) - train_parts["batch"] - train_parts["reference"] - policy_bytes
    elsewhere = {"rest of the train state": held}
    if train_parts["reference"]:
        elsewhere["reference"] = train_parts["reference"]
    elsewhere.update(train_elsewhere)
    rows, context = prompts * n, length + int(cfg.max_completion_length)
    flops = forward_flops(c, prompts * length, length, prompts)  # prefill; the head on each last position
    flops += int(cfg.max_completion_length) * forward_flops(c, rows, context, rows)  # decode over the cache
    notes = [f"{prompts} prompts of {length} tokens x {n} completions of {cfg.max_completion_length} tokens",
             "the decode loop stops early, so XLA's FLOPs count one decoded token; model FLOPs count them all"]
    if algorithm.name == "ppo":
        notes.append("not planned: PPO's rollout forward (policy, reference, value and reward model, no gradient)")
    return Program("sampler", lowered, parts, elsewhere, flops, notes, lower_s)
