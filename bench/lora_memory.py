"""Per-chip memory of jaxalign's DPO train step, full fine-tuning vs LoRA, by ahead-of-time compilation
for a TPU topology (issue 17: "LoRA DPO needs under half the per-chip memory of full DPO").

No TPU is needed: the step is lowered and compiled for a TPU topology description (libtpu from
``jax[tpu]``) and XLA's own memory analysis is read off the compiled executable. The step is
jaxalign's own: ``build_train_step`` with ``PairPreference.loss_fn``/``totals_fn`` for DPO, the
reference passed as ``extra`` (a full float32 copy of the params under full DPO; the adapters
zeroed under LoRA), AdamW from ``build_optimizer``, jitted with the Trainer's shardings and donation.
The model is Llama-3-8B-shaped (built abstractly with ``nnx.eval_shape``, no weights), bfloat16
compute, gradient checkpointing on, 2048 tokens per sequence, one preference pair per chip.

Compile time grows with depth (the decoder loops over layers in Python), so the script compiles a
few depths and fits memory = a + b * layers to extrapolate to Llama-3-8B's 32 layers.

One difference from the Trainer: the Trainer closes the frozen remainder of the model (``rest``;
under LoRA the bfloat16 base) over the step; here it is an explicit, non-donated argument with the
same sharding, so it is counted in the argument bytes (it is resident on the chips either way).

Run (a venv with ``jax[tpu]`` at the main env's jax version; jaxalign from the checkout)::

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/tpuvenv/bin/python bench/lora_memory.py --layers 2 4

Each (mode, layers) compile is saved to ``--results`` as it finishes, so a rerun skips what is
done; ``--table`` prints the table from the saved results without compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from jaxalign.config import resolve  # noqa: E402
from jaxalign.models.config import config_from_hf  # noqa: E402
from jaxalign.models.decoder import Decoder, set_remat  # noqa: E402
from jaxalign.models.lora import add_lora, cast_frozen  # noqa: E402
from jaxalign.parallel.rules import param_shardings  # noqa: E402
from jaxalign.trainers.optim import build_optimizer  # noqa: E402
from jaxalign.trainers.preference import PairPreference  # noqa: E402
from jaxalign.trainers.step import (  # noqa: E402
    TrainState,
    accumulation_sharding,
    build_train_step,
    optimizer_state_shardings,
    split_model,
)
from jaxalign.trainers.tuner import lora_settings  # noqa: E402

GIB = 1024**3

# meta-llama/Meta-Llama-3-8B config.json (the fields jaxalign reads).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}


def make_mesh(args) -> Mesh:
    if args.topology == "cpu":  # a smoke test of the script: XLA_FLAGS=--xla_force_host_platform_device_count=16
        devices = np.asarray(jax.devices("cpu"))
        return Mesh(devices.reshape(1, devices.size, 1), ("data", "fsdp", "tensor"))
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=args.topology, chip_config_name="default",
        chips_per_host_bounds=tuple(args.chips_per_host), num_slices=1,
    )
    devices = np.asarray(topo.devices)
    n = devices.size
    return Mesh(devices.reshape(1, n, 1), ("data", "fsdp", "tensor"))


def with_sharding(tree, shardings):
    """ShapeDtypeStructs of ``tree``'s leaves carrying ``shardings`` (a tree of the same structure or a prefix)."""
    return jax.tree.map(lambda s, x: jax.tree.map(lambda y: jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=s), x),
                        shardings, tree)


def compile_step(mode: str, layers: int, mesh: Mesh, args) -> dict:
    flags = {
        "rlhf_type": "dpo", "tuner_type": "lora" if mode == "lora" else "full", "torch_dtype": "bfloat16",
        "max_length": args.seq_len, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "gradient_checkpointing": True,
    }
    cfg = resolve("rlhf", None, flags)
    shape = dict(LLAMA3_8B, num_hidden_layers=layers)
    if args.tiny:  # the smoke test's model
        shape.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    config = config_from_hf(shape)
    dtype = jnp.dtype(cfg.torch_dtype)
    settings = lora_settings(cfg) if mode == "lora" else None

    def build():
        model = Decoder(config, dtype=dtype, rngs=nnx.Rngs(0))
        if settings is not None:  # as trainers.tuner.apply_tuner: fresh adapters on every target layer
            add_lora(model, settings, seed=int(cfg.seed) + 1)
        return model

    model = nnx.eval_shape(build)  # abstract: no weights are allocated
    set_remat(model, cfg.gradient_checkpointing, cfg.remat_policy)
    graphdef, params, rest = split_model(model)
    rest_sh = param_shardings(rest, mesh)
    params_sh = param_shardings(params, mesh)
    if settings is not None:  # the Trainer: the frozen base in the compute dtype
        rest = jax.eval_shape(lambda r: cast_frozen(r, cfg.torch_dtype), rest)

    algo = PairPreference(cfg)
    algo.lora = settings
    optimizer, schedule = build_optimizer(cfg, 1000)
    rep = NamedSharding(mesh, PartitionSpec())
    opt_sh = optimizer_state_shardings(optimizer, params, mesh)
    a_params = with_sharding(params, params_sh)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=a_params,
        opt_state=with_sharding(jax.eval_shape(optimizer.init, params), opt_sh),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    )
    # The DPO reference (PairPreference.extra): full DPO a float32 copy of the params, LoRA the adapters
    # zeroed (adapters_off) -- either way shaped and sharded like the trainable params.
    extra = a_params
    a_rest = with_sharding(rest, rest_sh)

    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.per_device_train_batch_size * dp
    accum = cfg.gradient_accumulation_steps
    t = args.seq_len
    batch_shapes = {}
    for side in ("chosen", "rejected"):
        batch_shapes[f"{side}_input_ids"] = ((accum, micro, t), jnp.int32)
        batch_shapes[f"{side}_attention_mask"] = ((accum, micro, t), jnp.int32)
        batch_shapes[f"{side}_loss_mask"] = ((accum, micro, t), jnp.float32)
    batch_shapes["margin"] = ((accum, micro), jnp.float32)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=accumulation_sharding(mesh, len(s)))
             for k, (s, d) in batch_shapes.items()}

    def step(state, batch, extra, rest):
        # jaxalign's step; the frozen remainder is an argument here instead of a closed-over constant.
        algo._graphdef, algo._rest = graphdef, rest
        fn = build_train_step(graphdef, rest, algo.loss_fn, algo.totals_fn, optimizer, schedule)
        return fn(state, batch, extra)

    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    state_sh = shardings(state)
    jitted = jax.jit(step, in_shardings=(state_sh, shardings(batch), shardings(extra), shardings(a_rest)),
                     out_shardings=(state_sh, None), donate_argnums=(0,))
    t0 = time.time()
    with jax.set_mesh(mesh):  # as the Trainer: traced under the mesh, so the activation constraints apply
        lowered = jitted.lower(state, batch, extra, a_rest)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}

    def nbytes(tree):
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    n_chips = mesh.devices.size
    rec = {
        "mode": mode, "layers": layers, "topology": args.topology, "chips": int(n_chips), "seq_len": t,
        "micro_batch_pairs": micro, "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        # Global (all-chip) sizes of the inputs, for reading the argument bytes.
        "global_params_bytes": nbytes(params), "global_opt_bytes": nbytes(state.opt_state),
        "global_reference_bytes": nbytes(extra), "global_frozen_bytes": nbytes(rest),
        "trainable_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        "largest_buffers": largest_buffers(compiled.as_text(), args.top),
    }
    rec["total_bytes"] = rec["argument_bytes"] + rec["output_bytes"] - rec["alias_bytes"] + rec["temp_bytes"]
    return rec


_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|s64|u64|f64)\[([0-9,]*)\]")
_SIZES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8, "f64": 8}


def largest_buffers(hlo: str, top: int) -> list[list]:
    """The largest per-chip array shapes defined in the optimized (partitioned) HLO, with how many
    instructions produce them: a guide to what dominates the temporaries."""
    counts: dict[str, int] = {}
    for line in hlo.splitlines():
        line = line.strip()
        if " = " not in line or line.startswith(("HloModule", "ROOT tuple", "//")):
            continue
        lhs = line.split(" = ", 1)[1]
        m = _SHAPE.match(lhs)
        if not m:
            continue
        key = f"{m.group(1)}[{m.group(2)}]"
        counts[key] = counts.get(key, 0) + 1

    def size(key):
        dt, dims = key.split("[")
        dims = [int(d) for d in dims.rstrip("]").split(",") if d]
        return int(np.prod(dims)) * _SIZES[dt] if dims else _SIZES[dt]

    ranked = sorted(counts, key=size, reverse=True)[:top]
    return [[k, round(size(k) / GIB, 3), counts[k]] for k in ranked]


def fit(points: list[tuple[int, float]]):
    """Least-squares a + b * layers."""
    x = np.asarray([p[0] for p in points], float)
    y = np.asarray([p[1] for p in points], float)
    if len(points) == 1:
        return float(y[0]), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def table(results: list[dict], target_layers: int) -> str:
    by = {(r["mode"], r["layers"]): r for r in results}
    layers = sorted({r["layers"] for r in results})
    g = lambda v: f"{v / GIB:8.2f}"  # noqa: E731
    lines = [f"{'layers':>6} | {'full args':>9} {'temp':>8} {'total':>8} | {'LoRA args':>9} {'temp':>8} {'total':>8} | "
             f"{'LoRA/full':>9}", "-" * 86]
    for n in layers:
        f, l = by.get(("full", n)), by.get(("lora", n))
        fs = f"{g(f['argument_bytes']):>9} {g(f['temp_bytes'])} {g(f['total_bytes'])}" if f else " " * 27
        ls = f"{g(l['argument_bytes']):>9} {g(l['temp_bytes'])} {g(l['total_bytes'])}" if l else " " * 27
        ratio = f"{l['total_bytes'] / f['total_bytes']:9.3f}" if f and l else ""
        lines.append(f"{n:>6} | {fs} | {ls} | {ratio}")
    ext = {}
    for mode in ("full", "lora"):
        pts = {k: [(r["layers"], r[k]) for r in results if r["mode"] == mode]
               for k in ("argument_bytes", "temp_bytes", "total_bytes")}
        if len(pts["total_bytes"]) >= 2:
            ext[mode] = {k: fit(v) for k, v in pts.items()}
    if len(ext) == 2:
        val = lambda mode, k: ext[mode][k][0] + ext[mode][k][1] * target_layers  # noqa: E731
        lines.append("-" * 86)
        lines.append(
            f"{target_layers:>6} | {g(val('full', 'argument_bytes')):>9} {g(val('full', 'temp_bytes'))} "
            f"{g(val('full', 'total_bytes'))} | {g(val('lora', 'argument_bytes')):>9} {g(val('lora', 'temp_bytes'))} "
            f"{g(val('lora', 'total_bytes'))} | {val('lora', 'total_bytes') / val('full', 'total_bytes'):9.3f}"
            "   <- extrapolated: a + b*layers, least squares over the compiled depths")
        for mode in ("full", "lora"):
            a, b = ext[mode]["total_bytes"]
            lines.append(f"  {mode}: total GiB/chip = {a / GIB:.3f} + {b / GIB:.4f} * layers")
        # The temporaries need not grow linearly (XLA schedules and rematerialises per program); a second
        # estimate: the resident bytes (arguments + outputs - aliased, exactly linear in depth) extrapolated,
        # plus the temporaries of the deepest compile.
        est = {}
        for mode in ("full", "lora"):
            rows = [r for r in results if r["mode"] == mode]
            a, b = fit([(r["layers"], r["total_bytes"] - r["temp_bytes"]) for r in rows])
            deepest = max(rows, key=lambda r: r["layers"])
            est[mode] = (a + b * target_layers, deepest["temp_bytes"], deepest["layers"])
        f, l = est["full"], est["lora"]
        lines.append(
            f"  resident bytes extrapolated + temporaries of the deepest compile: full {g(f[0] + f[1]).strip()} "
            f"(temp at {f[2]} layers), LoRA {g(l[0] + l[1]).strip()} (temp at {l[2]} layers), "
            f"LoRA/full {(l[0] + l[1]) / (f[0] + f[1]):.3f}")
    lines.append("GiB per chip; total = arguments + outputs - aliased (donated) + temporaries (XLA memory_analysis)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--topology", default="v5p:2x2x4",
                   help="v5e:4x4 refuses the step: its temporaries exceed a v5e chip's 16 GiB")
    p.add_argument("--chips_per_host", type=int, nargs=3, default=[2, 2, 1])
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--target_layers", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test of the script)")
    p.add_argument("--top", type=int, default=8, help="largest HLO buffer shapes to keep per compile")
    p.add_argument("--results", default="/tmp/lora_memory_results.json")
    p.add_argument("--table", action="store_true", help="print the table from --results and exit")
    args = p.parse_args(argv)

    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else []
    if not args.table:
        mesh = None
        for n in args.layers:
            for mode in args.modes:
                if any(r["mode"] == mode and r["layers"] == n and r["topology"] == args.topology
                       and r["seq_len"] == args.seq_len for r in results):
                    continue
                mesh = mesh or make_mesh(args)
                print(f"compiling {mode} DPO, {n} layers, {args.topology} ...", flush=True)
                rec = compile_step(mode, n, mesh, args)
                print(json.dumps({k: v for k, v in rec.items() if k != "largest_buffers"}), flush=True)
                for row in rec["largest_buffers"]:
                    print("   ", row, flush=True)
                results.append(rec)
                path.write_text(json.dumps(results, indent=1))
    results = [r for r in results if r["topology"] == args.topology and r["seq_len"] == args.seq_len]
    print(f"jax {jax.__version__}, topology {args.topology}, {args.seq_len} tokens/sequence, DPO")
    print(table(results, args.target_layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
