"""CPU step time of the demo's DPO and SFT stages with the LM head as before (full [B, T, V] logits) and
as now (:func:`jaxalign.trainers.logprobs.head_stats`), in one process, alternating rounds.

The model is the demo's (tiny char tokenizer, vocabulary 69, hidden 128, 4 layers, 4/2 heads, tied
embeddings, float32) with random weights; the batches have the demo stages' shapes at their longest
bucket (DPO 16 pairs, SFT 32 rows, 64 tokens). Each side jits the trainer's own loss (``PairPreference``
/ ``SFT``.loss_fn, DPO with the reference model in the step) under ``value_and_grad`` plus an AdamW
update. "before" swaps in the previous forward (``model(ids, attn)`` logits, then ``token_logps`` /
``vocab_mean_logits``); "chunked" forces 16-position chunks, to show what chunking would cost at this
size (the default runs one chunk here: T x V = 64 x 69 is far below ``SINGLE_CHUNK_ELEMENTS``).

Wall time is what a user waits; process CPU time (all threads) is the work done, steadier when other
processes share the cores; XLA's cost analysis of each compiled step (FLOPs, bytes accessed) does not
depend on the load at all.

Run by hand:  python bench/logprobs_cpu.py [--steps 20] [--rounds 5]     (--memory: the compiled memory at
32000 words x 2048 tokens instead, before and now)
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxalign.config import resolve
from jaxalign.demo import build_char_tokenizer
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.trainers import logprobs, preference, sft
from machine import cpu_model  # bench/machine.py


# ----- the previous path, verbatim ------------------------------------------------------------
def old_token_logps(logits, input_ids, *, temperature=1.0):
    logits = logits[:, :-1].astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.pad(logps, ((0, 0), (1, 0)))


def old_pair_forward(model, micro, **_):
    ids = jnp.concatenate([micro["chosen_input_ids"], micro["rejected_input_ids"]])
    attn = jnp.concatenate([micro["chosen_attention_mask"], micro["rejected_attention_mask"]])
    mask = jnp.concatenate([micro["chosen_loss_mask"], micro["rejected_loss_mask"]])
    logits = model(ids, attn)
    tlp = old_token_logps(logits, ids)
    sums, counts = logprobs.sequence_logps(tlp, mask)
    return sums, counts, jnp.mean(logits.astype(jnp.float32), axis=-1), tlp, mask, attn


def old_sft_loss(self, model, micro, totals, extra, rng):
    logits = model(micro["input_ids"], micro["attention_mask"])
    logps = old_token_logps(logits, micro["input_ids"])
    mask = micro["loss_mask"]
    nll = -jnp.sum(logps * mask) / totals["tokens"]
    predicted = jnp.argmax(logits[:, :-1], axis=-1)
    correct = (predicted == micro["input_ids"][:, 1:]).astype(jnp.float32) * mask[:, 1:]
    return nll, {"token_acc": jnp.sum(correct) / totals["tokens"]}


# ----- setup ----------------------------------------------------------------------------------
def batch_for(kind, rows, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    def side():
        ids = rng.integers(0, vocab, (rows, t)).astype(np.int32)
        attn = np.ones((rows, t), np.int32)
        loss = np.zeros((rows, t), np.int32)
        loss[:, t // 2 :] = 1
        return ids, attn, loss
    if kind == "sft":
        ids, attn, loss = side()
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    out = {}
    for s in ("chosen", "rejected"):
        ids, attn, loss = side()
        out.update({f"{s}_input_ids": ids, f"{s}_attention_mask": attn, f"{s}_loss_mask": loss})
    return out


def make_step(kind, model, tmp):
    flags = dict(model=tmp, dataset=tmp + "/x.jsonl", output_dir=tmp + "/out", mesh="data=1,fsdp=1,tensor=1")
    if kind == "dpo":
        algo = preference.PairPreference(resolve("rlhf", None, dict(rlhf_type="dpo", **flags)))
    else:
        algo = sft.SFT(resolve("sft", None, flags))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    algo._graphdef, algo._rest = graphdef, rest
    opt = optax.adamw(1e-4)
    ref = jax.tree.map(jnp.copy, params)

    def loss(p, micro):
        return algo.loss_fn(nnx.merge(graphdef, p, rest), micro, algo.totals_fn(micro), ref, None)

    @jax.jit
    def step(p, o, micro):
        (l, m), g = jax.value_and_grad(loss, has_aux=True)(p, micro)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    return step, params, opt.init(params)


SIDES = {
    "before": dict(chunk=None, old=True),
    "now": dict(chunk=None, old=False),
    "chunked(16)": dict(chunk=16, old=False),
}


def build(kind, side, model, tmp):
    """Trace and compile one side's step with its head path patched in; returns (step, params, opt)."""
    saved = (preference.pair_forward, sft.SFT.loss_fn, logprobs.SINGLE_CHUNK_ELEMENTS, logprobs.CHUNK_LEN)
    spec = SIDES[side]
    try:
        if spec["old"]:
            preference.pair_forward = old_pair_forward
            sft.SFT.loss_fn = old_sft_loss
        if spec["chunk"]:
            logprobs.SINGLE_CHUNK_ELEMENTS, logprobs.CHUNK_LEN = 0, spec["chunk"]
        step, params, opt = make_step(kind, model, tmp)
        batch = BATCH[kind]
        t0 = time.perf_counter()
        compiled = step.lower(params, opt, batch).compile()  # traced now, while patched
        seconds = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return compiled, params, opt, seconds, cost.get("flops", float("nan")), cost.get("bytes accessed", float("nan"))
    finally:
        preference.pair_forward, sft.SFT.loss_fn, logprobs.SINGLE_CHUNK_ELEMENTS, logprobs.CHUNK_LEN = saved


BATCH: dict = {}


def memory(tmp, vocab=32000, t=2048, hidden=256):
    """Temporary memory of the compiled DPO value-and-gradient (reference in the step) before and now, at a
    vocabulary and length where the head is chunked (compile only, nothing runs)."""
    cfg = llama_config(vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=t, tie_word_embeddings=False)
    model = random_model(cfg, seed=0)
    flags = dict(model=tmp, dataset=tmp + "/x.jsonl", output_dir=tmp + "/out", mesh="data=1,fsdp=1,tensor=1")
    algo = preference.PairPreference(resolve("rlhf", None, dict(rlhf_type="dpo", **flags)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    algo._graphdef, algo._rest = graphdef, rest
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    batch = {f"{s}_{k}": ids for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask")}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

    def loss(p, ref, micro):
        return algo.loss_fn(nnx.merge(graphdef, p, rest), micro, algo.totals_fn(micro), ref, None)

    print(f"\nDPO value+grad, 1 pair x {t} tokens, vocabulary {vocab}, hidden {hidden}, 2 layers, float32: "
          f"compiled temporary memory (full logits of one pass: {2 * t * vocab * 4 / 2**30:.2f} GiB)")
    for side, old in (("before", True), ("now", False)):
        saved = preference.pair_forward
        try:
            if old:
                preference.pair_forward = old_pair_forward
            compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(abstract, abstract, batch).compile()
        finally:
            preference.pair_forward = saved
        print(f"  {side:<7} {compiled.memory_analysis().temp_size_in_bytes / 2**30:6.2f} GiB", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="only compare the compiled memory at 32000 x 2048")
    args = ap.parse_args(argv)
    import tempfile

    tok = build_char_tokenizer()
    cfg = llama_config(len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128)
    model = random_model(cfg, seed=0)
    BATCH["dpo"] = batch_for("dpo", 16, 64, len(tok))
    BATCH["sft"] = batch_for("sft", 32, 64, len(tok))
    print(f"machine: {cpu_model()}, load average {os.getloadavg()[0]:.1f}, {jax.device_count()} CPU device(s), jax {jax.__version__}")
    print(f"demo model: vocabulary {len(tok)}, hidden 128, 4 layers; DPO 16 pairs x 64 tokens, SFT 32 x 64")
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            return memory(tmp)
        for kind in ("dpo", "sft"):
            built = {side: build(kind, side, model, tmp) for side in SIDES}
            times = {side: [] for side in SIDES}
            cpu = {side: [] for side in SIDES}
            for _ in range(args.rounds):
                for side, (step, params, opt, *_) in built.items():
                    p, o = params, opt
                    jax.block_until_ready(step(p, o, BATCH[kind]))
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(args.steps):
                        p, o, loss = step(p, o, BATCH[kind])
                    jax.block_until_ready(loss)
                    times[side].append((time.perf_counter() - t0) / args.steps)
                    cpu[side].append((time.process_time() - c0) / args.steps)
            print(f"\n{kind.upper()} step: wall and process CPU ms per step, best of {args.rounds} rounds of "
                  f"{args.steps} steps (median in brackets)")
            print("| path        | wall ms/step     | CPU ms/step      | compile s | XLA GFLOP | XLA GB accessed |")
            print("|-------------|------------------|------------------|-----------|-----------|-----------------|")
            for side in SIDES:
                w, c = np.array(times[side]) * 1e3, np.array(cpu[side]) * 1e3
                _, _, _, secs, flops, nbytes = built[side]
                print(f"| {side:<11} | {w.min():7.1f} ({np.median(w):6.1f}) | {c.min():7.1f} ({np.median(c):6.1f}) "
                      f"| {secs:9.1f} | {flops / 1e9:9.3f} | {nbytes / 1e9:15.3f} |", flush=True)


if __name__ == "__main__":
    main()
