"""Attention implementations side by side on this machine: forward + backward time of ``xla`` and ``chunked``
(and the peak of the compiled program's temporaries), per sequence length, in one process.

This is the measurement behind ``auto``'s CPU rule in jaxalign/models/attention.py
(``CHUNKED_MIN_KEYS``): ``xla`` below the length where ``chunked`` stops being slower.

Each case is a jitted ``value_and_grad`` of a sum over a left-padded causal batch; the implementations are
timed alternately for --rounds rounds of --reps calls each, and the best round counts.

Run by hand:  python bench/attention.py [--lengths 64,128,256,512,1024,2048] [--batch 8] [--heads 8]
              [--kv_heads 4] [--head_dim 64] [--window 0] [--rounds 3] [--reps 3] [--json out.json]
Check the script quickly:  python bench/attention.py --quick
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from machine import cpu_model  # bench/machine.py (the script's folder is on sys.path)

from jaxalign.models.attention import attend


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="64,128,256,512,1024,2048")
    ap.add_argument("--batch", type=int, default=8, help="rows (the DPO benchmark's 4 pairs)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=0, help="sliding window (0: none)")
    ap.add_argument("--impls", default="xla,chunked")
    ap.add_argument("--forward_only", action="store_true", help="time the forward alone (scoring, prefill)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="two short lengths, one round")
    return ap.parse_args(argv)


def case(impl: str, t: int, a):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(a.batch, t, a.heads, a.head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(a.batch, a.kv_heads, t, a.head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(a.batch, a.kv_heads, t, a.head_dim)), jnp.float32)
    valid = np.ones((a.batch, t), np.int32)
    valid[::2, : t // 4] = 0  # every other row left-padded by a quarter
    slots = jnp.arange(t)
    window = a.window or None

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, valid, slots, slots, sliding_window=window, impl=impl))

    fn = jax.jit(loss if a.forward_only else jax.value_and_grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    compiled = fn.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    jax.block_until_ready(compiled(q, k, v))
    return (lambda: jax.block_until_ready(compiled(q, k, v))), temp, compile_s


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.quick:
        a.lengths, a.rounds, a.reps = "64,256", 1, 1
    impls = a.impls.split(",")
    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"machine: {cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}")
    print(f"batch {a.batch}, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, window {a.window or 'none'}; "
          f"{'forward' if a.forward_only else 'forward + backward'}, best of {a.rounds} rounds x {a.reps} calls")
    header = f"{'T':>6} " + " ".join(f"{i + ' ms':>12} {i + ' temp MiB':>16} {i + ' compile s':>17}"
                                     for i in impls) + "  chunked/xla"
    print(header)
    rows = []
    for t in lengths:
        runs = {i: case(i, t, a) for i in impls}
        best = {i: float("inf") for i in impls}
        for _ in range(a.rounds):
            for i in impls:
                call = runs[i][0]
                t0 = time.perf_counter()
                for _ in range(a.reps):
                    call()
                best[i] = min(best[i], (time.perf_counter() - t0) / a.reps)
        row = {"T": t, **{f"{i}_ms": best[i] * 1e3 for i in impls},
               **{f"{i}_temp_mib": (runs[i][1] or 0) / 2**20 for i in impls},
               **{f"{i}_compile_s": runs[i][2] for i in impls}}
        ratio = best["chunked"] / best["xla"] if {"xla", "chunked"} <= set(impls) else float("nan")
        row["chunked_over_xla"] = ratio
        rows.append(row)
        print(f"{t:>6} " + " ".join(f"{best[i] * 1e3:>12.2f} {(runs[i][1] or 0) / 2**20:>16.1f} {runs[i][2]:>17.2f}"
                                    for i in impls)
              + f"  {ratio:>11.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
