"""Prefill + decode over a preallocated KV cache, inside one jit.

``generate`` splits the model once per call (``nnx.split``) and runs a jitted pure function
that prefills a cache of the prompts' slots with the left-padded prompts in one forward (the scanned layers over
the stacked cache), repeats the cache rows for ``num_return_sequences``, then samples token by token inside
``lax.while_loop`` until every row has produced a stop token or the budget is spent. The decode step runs the
layers unrolled over per-layer caches (read in place; on CPU over weights sliced out of the stack once, before
the loop: :func:`slices_weights_once`), in a few phases (:func:`decode_read_bounds`): each phase
adds a block of slots and attends only to the blocks so far, not the empty tail of the cache. The compiled
function is cached per (model graph, mesh, sampling settings) and jit's own cache keys the shapes, so a repeat
call with the same shapes neither retraces nor recompiles (see :func:`trace_count`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from jaxalign.errors import ShardingError
from jaxalign.models import kv_cache
from jaxalign.models.kv_cache import KVCache, init_cache
from jaxalign.parallel.activations import mesh_context
from jaxalign.parallel.distributed import put_key
from jaxalign.parallel.mesh import mesh_platform
from jaxalign.parallel.rules import batch_sharding, logical_to_spec, param_shardings
from jaxalign.rollout.sampling import process_logits, select_tokens, token_logps


@struct.dataclass
class Rollout:
    """Sampled responses, row ``i * n + j`` being copy ``j`` of prompt ``i``.

    tokens   [R, max_new_tokens] int32, the pad id after a row's stop token
    logps    [R, max_new_tokens] float32, log softmax(model logits / T) of each sampled token
             (T = 1 for greedy); not renormalised by top-k/top-p, no repetition penalty;
             0 where ``mask`` is 0
    mask     [R, max_new_tokens] int32, 1 up to and including the first stop token
    lengths  [R] int32, ``mask.sum(-1)``
    finished [R] bool, the row ended with a stop token (else it ran out of budget)
    steps    [] int32, token positions actually decoded (< max_new_tokens when every row
             stopped early)
    """

    tokens: jax.Array
    logps: jax.Array
    mask: jax.Array
    lengths: jax.Array
    finished: jax.Array
    steps: jax.Array


@dataclasses.dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    num_return_sequences: int
    pad_token_id: int


_TRACES = 0


def trace_count() -> int:
    """How many times the sampler's function has been traced (= compiled) in this process."""
    return _TRACES


def default_stop_token_ids(config) -> tuple[int, ...]:
    """EOS ids of the model's config.json and generation_config.json, in order, deduplicated."""
    ids: list[int] = []
    sources = [config.eos_token_id, (config.generation_config or {}).get("eos_token_id")]
    for value in sources:
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if int(v) not in ids:
                ids.append(int(v))
    return tuple(ids)


def generate(
    model: nnx.Module | tuple[Any, Any],
    prompt_ids,
    prompt_mask,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | np.ndarray | jax.Array | None = None,
    rng: jax.Array | int | None = None,
    num_return_sequences: int = 1,
    pad_token_id: int | None = None,
    mesh: Mesh | None = None,
) -> Rollout:
    """Sample ``max_new_tokens`` continuations of left-padded prompts [B, P].

    ``model`` is a :class:`~jaxalign.models.Decoder` or its ``(graphdef, state)`` split.
    ``temperature=0`` is greedy. ``stop_token_ids``: None for the model's EOS ids, a sequence
    of ids shared by all rows, or an int array [B, S] of per-row ids padded with -1.
    ``repetition_penalty`` follows Hugging Face over the prompt's real tokens and the tokens
    generated so far. With ``mesh``, rows are sharded over (data, fsdp) and parameters by
    their logical axes; B must be divisible by data * fsdp.
    Returns a :class:`Rollout` with ``B * num_return_sequences`` rows.
    """
    if isinstance(model, tuple):
        graphdef, state = model
        config = nnx.merge(graphdef, state).config
    else:
        graphdef, state = nnx.split(model)
        config = model.config
    if isinstance(prompt_mask, np.ndarray) and prompt_mask.size and not np.asarray(prompt_mask)[:, -1].all():
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all ones")

    b, _ = np.shape(prompt_ids)
    fn, stops = sampler_call(
        graphdef, config, b, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids,
        num_return_sequences=num_return_sequences, pad_token_id=pad_token_id, mesh=mesh,
    )
    if rng is None:
        rng = jax.random.key(0)
    elif isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    stops = jnp.asarray(stops, jnp.int32)
    if mesh is not None:
        state = jax.device_put(state, param_shardings(state, mesh))
        prompt_ids, prompt_mask, stops = jax.device_put((prompt_ids, prompt_mask, stops), batch_sharding(mesh))
        rng = put_key(rng, NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with mesh_context(mesh):  # the model's activations sharded over the rows (parallel.activations)
        return fn(state, prompt_ids, prompt_mask, stops, rng)


def sampler_call(
    graphdef,
    config,
    batch: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | np.ndarray | jax.Array | None = None,
    num_return_sequences: int = 1,
    pad_token_id: int | None = None,
    mesh: Mesh | None = None,
):
    """``(fn, stops)``: the jitted sampler :func:`generate` runs for ``batch`` prompts with these settings,
    ``fn(state, prompt_ids, prompt_mask, stops, rng) -> Rollout``, and the [batch, S] stop-id array it
    takes. ``jaxalign plan`` lowers the same ``fn`` with abstract arguments."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    if mesh is not None:
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch % rows:
            raise ShardingError(
                f"sampling batch of {batch} prompts does not divide the mesh's data*fsdp = {rows} devices; "
                f"use a batch size that is a multiple of {rows}"
            )
    settings = _Settings(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k) if temperature > 0 else 0,
        top_p=float(top_p) if temperature > 0 else 1.0,
        repetition_penalty=float(repetition_penalty),
        num_return_sequences=int(num_return_sequences),
        pad_token_id=int(pad_token_id),
    )
    row_parts = decode_row_parts(mesh, batch * settings.num_return_sequences)
    return _compiled(graphdef, settings, mesh, row_parts), _stop_array(stop_token_ids, config, batch)


def _stop_array(stop_token_ids, config, batch: int) -> np.ndarray:
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(config)
    if isinstance(stop_token_ids, (np.ndarray, jax.Array)) and np.ndim(stop_token_ids) == 2:
        arr = np.asarray(stop_token_ids, np.int32)
        if arr.shape[0] != batch:
            raise ValueError(f"per-row stop_token_ids has {arr.shape[0]} rows for a batch of {batch}")
        return arr if arr.shape[1] else np.full((batch, 1), -1, np.int32)
    ids = [int(t) for t in np.asarray(stop_token_ids).reshape(-1)]
    if not ids:
        ids = [-1]
    return np.tile(np.asarray(ids, np.int32)[None, :], (batch, 1))


DECODE_PHASES = 4
MIN_PHASE_TOKENS = 32


def decode_read_bounds(prompt_len: int, max_new_tokens: int) -> tuple[int, ...]:
    """Where the decode phases' cache blocks end: the prompt plus up to ``DECODE_PHASES`` equal shares of the
    budget, each at least ``MIN_PHASE_TOKENS`` (128 new tokens: P+32, P+64, P+96, P+128; 8: P+8). Each phase is
    a copy of the decode step in the program, so their number stays small."""
    share = max(MIN_PHASE_TOKENS, -(-max_new_tokens // DECODE_PHASES))
    return tuple(prompt_len + min(max_new_tokens, k * share) for k in range(1, -(-max_new_tokens // share) + 1))


def slices_weights_once(mesh: Mesh | None) -> bool:
    """Whether the decode loop reads layer weights sliced once before it (a second copy of every layer's weights
    for the whole decode) rather than out of the stacked parameters at each step: on CPU, where XLA copies such a
    slice at every step before the dot (measured 2.27 -> 1.98 s for 64 tokens x 64 rows at ~23M parameters) and
    host memory is plentiful. On TPU the copy did not fit at Llama-3-8B shape (v5e:4x4, GRPO LoRA: 14.5 -> 16.7
    GiB per chip) and the slices are read where they lie."""
    return mesh_platform(mesh) == "cpu"


def decode_row_parts(mesh: Mesh | None, rows: int) -> int:
    """How many row parts the decode's per-layer cache is split into (see :func:`kv_cache.unstack`): 2 on one CPU
    device with an even number of at least 16 rows, else 1. XLA:CPU runs each attention dot over the cache (one
    query per row) on one thread; two parts' dots run on two cores when the program is scheduled for concurrency
    (:func:`compiler_options`). Measured (60M parameters, 64 rows, 128 + 128 tokens): 61.3 -> 56.9 ms per step;
    the split alone, or the scheduling alone, saves nothing; 4 parts: 58.8 ms."""
    single = mesh is None or mesh.devices.size == 1
    return 2 if mesh_platform(mesh) == "cpu" and single and rows % 2 == 0 and rows >= 16 else 1


# XLA:CPU's concurrency-optimised scheduling, which lets independent operations run on different cores, in the
# spellings XLA has used, newest first. jax 0.10-0.12's XLA take the enum; 0.12's still accepts the older bool
# but no longer acts on it (the 60M decode step with row parts, batch 64: 62-66 ms with the enum, 67-71 with the
# bool or nothing; on jax 0.10.2 the two spellings measured alike, 57-61 ms).
CPU_SCHEDULING = (
    (("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"),),
    (("xla_cpu_enable_concurrency_optimized_scheduler", True),),
)


@functools.lru_cache(maxsize=None)
def compiler_options(platform: str, candidates: tuple[tuple[tuple[str, object], ...], ...] = CPU_SCHEDULING):
    """The sampler's XLA options: on CPU the first of ``candidates`` (by default :data:`CPU_SCHEDULING`) this XLA
    knows (each checked by compiling a trivial program), else none."""
    if platform != "cpu":
        return None
    for options in candidates:
        try:
            jax.jit(lambda x: x + 1, compiler_options=dict(options))(jnp.zeros((), jnp.int32)).block_until_ready()
        except Exception:  # an XLA without the option: "No such compile option" or "not a valid enum value"
            continue
        return dict(options)
    return None


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, settings: _Settings, mesh: Mesh | None, row_parts: int):
    """The jitted sampler; with row parts it is compiled with :func:`compiler_options` (alone they save nothing)."""
    options = compiler_options(mesh_platform(mesh)) if row_parts > 1 else None
    return jax.jit(functools.partial(_sample, graphdef, settings, mesh, row_parts), compiler_options=options)


def _constrain(x: jax.Array, axes: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    if mesh is None:
        return cache
    if kv_cache.is_unstacked(cache):  # per layer: blocks, or blocks of row parts
        keys = jax.tree.map(lambda b: _constrain(b, kv_cache.LAYER_KV_AXES, mesh), cache.keys)
        values = jax.tree.map(lambda b: _constrain(b, kv_cache.LAYER_KV_AXES, mesh), cache.values)
    else:
        keys = _constrain(cache.keys, kv_cache.KV_AXES, mesh)
        values = _constrain(cache.values, kv_cache.KV_AXES, mesh)
    return cache.replace(
        keys=keys,
        values=values,
        mask=_constrain(cache.mask, ("batch", "length"), mesh),
        lengths=_constrain(cache.lengths, ("batch",), mesh),
    )


def _sample(graphdef, s: _Settings, mesh, row_parts: int, state, prompt_ids, prompt_mask, stops, rng) -> Rollout:
    global _TRACES
    _TRACES += 1  # runs once per trace
    model = nnx.merge(graphdef, state)
    config = model.config
    b, p = prompt_ids.shape
    n, steps_max, pad = s.num_return_sequences, s.max_new_tokens, s.pad_token_id
    vocab = config.vocab_size

    # The prefill fills a cache of the prompt's slots; the decode phases' slots are added as blocks after it.
    cache = _constrain_cache(init_cache(config, b, p, model.dtype), mesh)
    hidden, cache = model.hidden_states(prompt_ids, prompt_mask, cache=cache)
    # Left padding: the last column is every row's last real token; project only that one.
    logits = model.logits(hidden[:, -1])
    seen = None
    if s.repetition_penalty != 1.0:
        seen = jnp.zeros((b, vocab), jnp.bool_).at[jnp.arange(b)[:, None], prompt_ids].max(prompt_mask > 0)
    if n > 1:  # one prefill per prompt, then n copies of its cache rows
        rep = functools.partial(jnp.repeat, repeats=n, axis=0)
        rep_kv = functools.partial(jnp.repeat, repeats=n, axis=1)  # [layers, B, ...]
        cache = cache.replace(
            keys=rep_kv(cache.keys), values=rep_kv(cache.values),
            mask=rep(cache.mask), lengths=rep(cache.lengths),
        )
        logits, stops = rep(logits), rep(stops)
        seen = None if seen is None else rep(seen)
    # Decode over per-layer caches with the layers unrolled: inside the layer scan each step would copy its
    # layer out of the stacked cache before attending (measured ~30% of decode time at batch 64 on CPU).
    bounds = decode_read_bounds(p, steps_max)
    r = b * n
    cache = kv_cache.unstack(cache, blocks=np.diff((p, *bounds)).tolist(), row_parts=row_parts)
    cache = _constrain_cache(cache, mesh)
    layers = model.layer_list() if slices_weights_once(mesh) else None  # else sliced inside each step
    rows = jnp.arange(r)

    def pick(logits, seen, i, done):
        processed = process_logits(
            logits, seen, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
        )
        tok = select_tokens(processed, jax.random.fold_in(rng, i), s.temperature)
        lp = token_logps(logits, tok, s.temperature)
        tok = jnp.where(done, pad, tok)
        lp = jnp.where(done, 0.0, lp)
        if seen is not None:
            seen = seen.at[rows, tok].max(~done)
        stopped = jnp.any(tok[:, None] == stops, axis=-1)
        return tok, lp, seen, stopped

    not_done = jnp.zeros((r,), jnp.bool_)
    tok, lp, seen, stopped = pick(logits, seen, 0, not_done)
    tokens = jnp.full((r, steps_max), pad, jnp.int32).at[:, 0].set(tok)
    logps = jnp.zeros((r, steps_max), jnp.float32).at[:, 0].set(lp)
    tokens, logps = _constrain(tokens, ("batch", None), mesh), _constrain(logps, ("batch", None), mesh)
    lengths = jnp.ones((r,), jnp.int32)
    ones = jnp.ones((r, 1), jnp.int32)

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < steps_max) & ~jnp.all(done)

    def body(carry, blocks):
        i, tok, cache, done, tokens, logps, lengths, seen = carry
        step_logits, part = model(tok[:, None], ones, cache=kv_cache.first_blocks(cache, blocks), layers=layers)
        cache = _constrain_cache(kv_cache.put_blocks(cache, part), mesh)
        tok, lp, seen, stopped = pick(step_logits[:, 0], seen, i, done)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        logps = jax.lax.dynamic_update_slice(logps, lp[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, tok, cache, done | stopped, tokens, logps, lengths, seen

    # Decode in phases: phase j's steps write slots p + i - 1 < bounds[j] into block j + 1 and attend only to
    # blocks 0..j + 1 (block 0: the prompt), so no step reads the empty tail of the cache. Each phase is its own
    # while loop (a copy of the step in the program), stopping early like the others once every row is done.
    carry = (jnp.int32(1), tok, cache, stopped, tokens, logps, lengths, seen)
    for j, bound in enumerate(bounds):
        def phase_cond(carry, last=bound - p):
            return cond(carry) & (carry[0] <= last)

        carry = jax.lax.while_loop(phase_cond, functools.partial(body, blocks=j + 2), carry)
    steps, _, _, done, tokens, logps, lengths, _ = carry
    mask = (jnp.arange(steps_max)[None, :] < lengths[:, None]).astype(jnp.int32)
    return Rollout(tokens=tokens, logps=logps, mask=mask, lengths=lengths, finished=done, steps=steps)
