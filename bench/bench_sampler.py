"""Decode throughput of jaxalign's sampler against transformers.generate, same weights, same run.

A random-weight Llama-style model (~60M parameters by default) is built once with
transformers (PyTorch, float32), saved, and loaded into jaxalign from the same folder. Both
generate greedily with EOS suppressed (every row produces exactly --new_tokens tokens) from
random left-aligned prompts of --prompt_len tokens. jaxalign is compiled first and the compile
time reported separately; both sides are warmed up, then timed over --repeats runs (best kept).

On a GPU (`bench/gpu.sh` runs this): --device cuda --dtype bfloat16 --shape qwen2.5-0.5b builds a random-weight
model of that shape; the decode bandwidth (weights + the KV cache read per step, per second) is then also given as
a share of the GPU's HBM bandwidth (bench/machine.py's table).

Run by hand:  python bench/bench_sampler.py [--batch_sizes 16,64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from machine import SHAPES, cpu_model, gpu_peaks  # bench/machine.py (the script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_sizes", default="16,64")
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip_hf", action="store_true", help="time jaxalign only")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a named model shape instead of the sizes above")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' weights")
    ap.add_argument("--device", default="cpu", help="transformers' device (jax uses its default backend)")
    ap.add_argument("--quick", action="store_true", help="tiny model and shapes: checks the script in seconds")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats = "4", 16, 16, 1
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab = 64, 2, 4, 2, 128, 1000

    import jax
    import numpy as np
    import torch
    import transformers

    from jaxalign.convert import load_hf_model
    from jaxalign.rollout import generate, trace_count

    ncpu = os.cpu_count() or 1
    torch.set_num_threads(ncpu)
    positions = max(2048, args.prompt_len + args.new_tokens)
    if args.shape:
        cls, shape = SHAPES[args.shape]
        cfg = getattr(transformers, cls)(**shape, max_position_embeddings=positions, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0)
        args.vocab = cfg.vocab_size
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=positions, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        )
    torch.manual_seed(0)
    torch_dtype = getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    folder = tempfile.mkdtemp(prefix="bench_sampler_")
    hf.save_pretrained(folder, safe_serialization=True)
    hf = hf.to(args.device)
    model = load_hf_model(folder, dtype=args.dtype)
    # Bytes a decode step must read: every weight but the input embedding's unused rows (a tied embedding is read
    # whole as the LM head), and the KV cache's filled slots (P + N/2 on average over the steps).
    embed = 0 if cfg.tie_word_embeddings else hf.get_input_embeddings().weight.numel()
    width = 2 if args.dtype == "bfloat16" else 4
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weight_bytes = (n_params - embed) * width
    kv_bytes_per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * width \
        * (args.prompt_len + args.new_tokens / 2)
    peaks = gpu_peaks(torch.cuda.get_device_name()) if args.device.startswith("cuda") else None
    # Suppress EOS on both sides: no stop token at all, every row runs the full budget.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    print(f"machine: {ncpu} CPUs, {cpu_model()}; jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"model: {args.shape or f'llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} mlp={args.intermediate} vocab={args.vocab}'}: "
          f"{n_params / 1e6:.1f}M parameters, {args.dtype}; transformers on {args.device}, jax on {jax.default_backend()}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, no early stop\n")

    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        rng = np.random.default_rng(b)
        ids = rng.integers(3, args.vocab, size=(b, args.prompt_len)).astype(np.int32)
        mask = np.ones_like(ids)

        def run_jax(n_new):
            out = generate(model, ids, mask, max_new_tokens=n_new, temperature=0.0, stop_token_ids=())
            return jax.block_until_ready(out)

        t0 = time.perf_counter()
        before = trace_count()
        out = run_jax(args.new_tokens)
        compile_s = time.perf_counter() - t0
        assert trace_count() == before + 1
        jax_s = min(_timed(lambda: run_jax(args.new_tokens)) for _ in range(args.repeats))
        assert trace_count() == before + 1, "the sampler retraced on a repeat call"
        assert int(out.steps) == args.new_tokens and int(out.lengths.min()) == args.new_tokens
        run_jax(1)
        jax_prefill_s = min(_timed(lambda: run_jax(1)) for _ in range(args.repeats))
        # The first call traces, compiles and runs: its excess over a warm run is the compile time.
        row = dict(batch=b, compile_s=compile_s - jax_s, jax_s=jax_s, jax_prefill_s=jax_prefill_s)

        if not args.skip_hf:
            t_ids = torch.tensor(ids, dtype=torch.long, device=args.device)
            t_mask = torch.tensor(mask, dtype=torch.long, device=args.device)

            def run_hf(n_new):
                with torch.inference_mode():
                    out = hf.generate(t_ids, attention_mask=t_mask, do_sample=False, max_new_tokens=n_new,
                                      min_new_tokens=None, pad_token_id=0, eos_token_id=None)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                return out

            run_hf(2)  # warm-up
            hf_out = None

            def timed_hf():
                nonlocal hf_out
                hf_out = run_hf(args.new_tokens)

            hf_s = min(_timed(timed_hf) for _ in range(args.repeats))
            assert hf_out.shape[1] == args.prompt_len + args.new_tokens
            hf_prefill_s = min(_timed(lambda: run_hf(1)) for _ in range(args.repeats))
            hf_tokens = hf_out[:, args.prompt_len:].cpu().numpy()
            ours = np.asarray(out.tokens)
            first = np.argmax(np.concatenate([hf_tokens != ours, np.ones((b, 1), bool)], axis=1), axis=1)
            row.update(hf_s=hf_s, hf_prefill_s=hf_prefill_s, agree=float(np.mean(first)))
        rows.append(row)
        print(_fmt(row, args), flush=True)

    print("\n| batch | jaxalign tok/s | transformers tok/s | ratio | jaxalign decode tok/s | transformers decode tok/s "
          "| decode ratio | jaxalign compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gen = r["batch"] * args.new_tokens
        dec = r["batch"] * (args.new_tokens - 1)
        j, jd = gen / r["jax_s"], dec / (r["jax_s"] - r["jax_prefill_s"])
        if "hf_s" in r:
            h, hd = gen / r["hf_s"], dec / (r["hf_s"] - r["hf_prefill_s"])
            print(f"| {r['batch']} | {j:.0f} | {h:.0f} | {j / h:.2f}x | {jd:.0f} | {hd:.0f} | {jd / hd:.2f}x "
                  f"| {r['compile_s']:.1f} |")
        else:
            print(f"| {r['batch']} | {j:.0f} | - | - | {jd:.0f} | - | - | {r['compile_s']:.1f} |")
    print("\ndecode bandwidth (weights + the KV cache's filled slots read per step):")
    for r in rows:
        step_s = (r["jax_s"] - r["jax_prefill_s"]) / (args.new_tokens - 1)
        gbps = (weight_bytes + r["batch"] * kv_bytes_per_row) / step_s / 1e9
        share = f", {100 * gbps * 1e9 / peaks[1]:.0f}% of the HBM's {peaks[1] / 1e9:.0f} GB/s" if peaks else ""
        print(f"batch {r['batch']}: jaxalign {step_s * 1e3:.2f} ms per decode step, {gbps:.1f} GB/s{share}")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _fmt(r, args) -> str:
    s = (f"batch {r['batch']}: jaxalign {r['jax_s']:.2f}s (prefill {r['jax_prefill_s']:.2f}s, "
         f"compile {r['compile_s']:.1f}s)")
    if "hf_s" in r:
        s += (f"; transformers {r['hf_s']:.2f}s (prefill {r['hf_prefill_s']:.2f}s); "
              f"greedy tokens agree for the first {r['agree']:.1f} of {args.new_tokens} on average")
    return s


if __name__ == "__main__":
    main()
