"""DPO training throughput of jaxalign against TRL's DPOTrainer: same weights, same data, same shapes, same run.

A random-weight Llama-style model (~40M parameters by default: hidden 512, 8 layers, 8/4 heads,
MLP 1376, vocabulary 16000, untied head) is built once with transformers (PyTorch, float32) and
saved with a word-level tokenizer; jaxalign and TRL both load it from that folder. Every
preference row tokenises to exactly --seq_len tokens for chosen and for rejected (a prompt of
seq_len/2 words, a reply of seq_len/2 - 1 words plus EOS), so neither side pads.

Both sides train plain sigmoid DPO (beta 0.1, no NLL term: jaxalign --rpo_alpha 0, TRL's default
loss_type ["sigmoid"]) against a frozen reference model computed on the fly, float32, no gradient
checkpointing, batch --batch_size, one micro-batch per step, AdamW with lr 1e-6 and clipping at 1.0.
jaxalign runs its own loop body (`algo.next_batch` + `train_step`, metrics fetched each
step); its first step compiles and is reported separately. TRL runs `DPOTrainer.train()`
(use_cpu, no dataloader workers, no logging or saving); its first --warmup steps are not timed.
The two are timed alternately for --rounds rounds of --steps steps each; the best round counts.

tokens/s = batch * 2 * seq_len * steps / time (chosen + rejected tokens through the policy).
MFU = model FLOPs per step / seconds per step / this machine's float32 matmul rate, measured with
a jitted jnp.dot of two 2048x2048 matrices (numpy and torch shown for reference). Model FLOPs per
step = 4 * tokens * (2 * N + 4 * layers * seq_len * hidden): the policy's forward and backward
(3 forwards) plus the reference forward, N = the parameters used in matmuls (all but the input
embedding), the second term the attention scores and weighted sum, counted in full.

Needs TRL, which is not a jaxalign dependency:  pip install trl

On a GPU (`bench/gpu.sh` runs this): --device cuda --dtype bfloat16 --shape qwen2.5-0.5b trains a random-weight
model of that shape, jaxalign with bfloat16 compute over float32 masters and TRL with bf16 autocast (the same),
and MFU is taken against the GPU's dense bfloat16 peak (bench/machine.py's table) instead of a measured rate.

Run by hand:  python bench/bench_train.py [--batch_size 4] [--seq_len 128] [--steps 5] [--rounds 2] [--json out.json]
(about 270 GFLOP per step at the defaults: several seconds a step on 2 cores, a few minutes in all)
Check the script quickly (tiny model, well under a minute):  python bench/bench_train.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import SHAPES, cpu_model, gpu_peaks  # bench/machine.py (the script's folder is on sys.path)

TEMPLATE = (
    "{% for message in messages %}{{ message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_size", type=int, default=4, help="preference pairs per step (both sides)")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens of each chosen / rejected sequence (even)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds (best kept)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed TRL steps at the start of each round")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--matmul_n", type=int, default=2048, help="size of the square matmul timing the machine")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a named model shape instead of the sizes above")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' compute dtype")
    ap.add_argument("--device", default="cpu", help="TRL's device, cpu or cuda (jax uses its default backend)")
    ap.add_argument("--quick", action="store_true", help="tiny model and shapes: checks the script in under a minute")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.shape:
        args.hidden, args.layers = SHAPES[args.shape][1]["hidden_size"], SHAPES[args.shape][1]["num_hidden_layers"]
        args.vocab = SHAPES[args.shape][1]["vocab_size"]
    if args.quick:
        args.batch_size, args.seq_len, args.steps, args.rounds, args.warmup = 2, 64, 3, 1, 1
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab = 128, 2, 4, 2, 344, 2000
        args.matmul_n = 1024
    if args.seq_len < 4 or args.seq_len % 2:
        ap.error(f"--seq_len {args.seq_len}: give an even length of at least 4")
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0:
        ap.error("--batch_size, --steps and --rounds must be at least 1, --warmup at least 0")
    return args


def require_trl():
    import importlib

    try:
        importlib.import_module("trl")
    except ImportError:
        sys.exit("bench_train.py compares against TRL's DPOTrainer, which is not installed (it is not a jaxalign "
                 "dependency): pip install trl")


# ----- the shared model, tokenizer and data ------------------------------------------------------
def build_folder(args, folder: Path):
    """Save a random-weight Llama and a word-level tokenizer (with a chat template) into ``folder``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), args.vocab)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(folder))
    if args.shape:
        cls, shape = SHAPES[args.shape]
        cfg = getattr(transformers, cls)(**shape, max_position_embeddings=max(2048, args.seq_len), bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(folder), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    # the input embedding is a lookup; a tied one is still the LM head's matmul
    n_matmul = n_params - (0 if cfg.tie_word_embeddings else model.get_input_embeddings().weight.numel())
    return tok, n_params, n_matmul


def make_rows(args, n_rows: int):
    """(jaxalign rows, TRL conversational rows): the same pairs, every sequence exactly seq_len tokens."""
    import numpy as np

    rng = np.random.default_rng(0)
    half = args.seq_len // 2

    def words(n):
        return " ".join(f"w{i}" for i in rng.integers(4, args.vocab, size=n))

    ours, theirs = [], []
    for _ in range(n_rows):
        prompt, chosen, rejected = words(half), words(half - 1), words(half - 1)
        ours.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                     "rejected_response": rejected})
        theirs.append({"prompt": [{"role": "user", "content": prompt}],
                       "chosen": [{"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "assistant", "content": rejected}]})
    return ours, theirs


# ----- the machine's matmul rate ----------------------------------------------------------------
def best_time(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_rates(n: int, repeats: int = 5) -> dict[str, float]:
    """float32 FLOP/s of an n x n matmul with jax (jitted), numpy and torch; best of ``repeats``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    flops = 2.0 * n ** 3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {
        "jax": flops / best_time(lambda: dot(ja, jb).block_until_ready(), repeats),
        "numpy": flops / best_time(lambda: a @ b, repeats),
        "torch": flops / best_time(lambda: torch.mm(ta, tb), repeats),
    }


# ----- jaxalign ---------------------------------------------------------------------------------
class JaxSide:
    def __init__(self, args, folder: Path, data_file: Path, out: Path, total_steps: int):
        import jax

        from jaxalign.config import resolve
        from jaxalign.data.batching import stack_micro_batches
        from jaxalign.trainers.run import build_trainer

        self.jax = jax
        self.stack = stack_micro_batches
        cfg = resolve("rlhf", None, {
            "model": str(folder), "dataset": str(data_file), "output_dir": str(out),
            "rlhf_type": "dpo", "loss_type": "sigmoid", "beta": 0.1, "rpo_alpha": 0.0,
            "mesh": "data=1,fsdp=1,tensor=1", "gradient_checkpointing": False, "torch_dtype": args.dtype,
            "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
            "max_length": args.seq_len,  # the default length buckets (64, 128, ...): no row is padded
            # TRL's / transformers' defaults, so both sides run the same optimizer
            "learning_rate": 1e-6, "lr_scheduler_type": "linear", "weight_decay": 0.0,
            "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
            "max_steps": total_steps, "logging_steps": 10 ** 6, "save_steps": 10 ** 6, "save_hf": False,
        })
        self.trainer = build_trainer(cfg, quiet=True)
        batch = stack_micro_batches(self.trainer.algo.next_batch(self.trainer), self.trainer.pad_id)
        # the default shared-prefix layout: each row the prompt once, then chosen and rejected (seq_len / 2 each)
        want = {"input_ids": (1, args.batch_size, args.seq_len // 2 + args.seq_len)}
        if "input_ids" not in batch:  # a sequence per reply
            want = {k: (1, args.batch_size, args.seq_len) for k in ("chosen_input_ids", "rejected_input_ids")}
        for key, shape in want.items():
            if batch[key].shape != shape or not batch[key.replace("input_ids", "attention_mask")].all():
                raise SystemExit(f"jaxalign batch {key} is {batch[key].shape}, not {shape} unpadded; the data is off")
        t = time.perf_counter()
        m = jax.device_get(self.trainer.train_step(batch))
        self.first_step_s = time.perf_counter() - t
        self.first_loss = float(m["loss"])

    def run(self, steps: int) -> tuple[float, float]:
        """(seconds for ``steps`` steps, mean loss), as the training loop runs them."""
        losses = []
        t = time.perf_counter()
        for _ in range(steps):
            batch = self.stack(self.trainer.algo.next_batch(self.trainer), self.trainer.pad_id)
            losses.append(float(self.jax.device_get(self.trainer.train_step(batch))["loss"]))
        return time.perf_counter() - t, sum(losses) / len(losses)


# ----- TRL --------------------------------------------------------------------------------------
class TRLSide:
    def __init__(self, args, folder: Path, rows: list[dict], out: Path):
        import torch
        import transformers
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        transformers.logging.set_verbosity_error()
        self.args = args
        self.times: list[float] = []
        side = self

        class Clock(transformers.TrainerCallback):
            def on_train_begin(self, a, state, control, **kw):
                side.times = [time.perf_counter()]

            def on_step_end(self, a, state, control, **kw):
                side.times.append(time.perf_counter())

        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        cfg = dict(
            output_dir=str(out), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_length=args.seq_len, padding_free=False, beta=0.1, loss_type=["sigmoid"],
            learning_rate=1e-6, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
            gradient_checkpointing=False, bf16=args.dtype == "bfloat16", fp16=False, use_cpu=args.device == "cpu",
            max_steps=args.warmup + args.steps, dataloader_num_workers=0, report_to="none",
            logging_steps=10 ** 6, save_strategy="no", disable_tqdm=True, seed=42,
        )
        fields = DPOConfig.__dataclass_fields__
        if "activation_checkpointing" in fields:  # transformers 5: the new name wins over TRL's default of True
            cfg["activation_checkpointing"] = cfg.pop("gradient_checkpointing")
        if "rpo_alpha" in fields:  # older TRL: keep the NLL term off
            cfg["rpo_alpha"] = None
        self.trainer = DPOTrainer(model=model, ref_model=ref, args=DPOConfig(**cfg), processing_class=tok,
                                  train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
        self.trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no log dicts on stdout
        if self.trainer.args.gradient_checkpointing or self.trainer.args.bf16 != (args.dtype == "bfloat16"):
            raise SystemExit("TRL's config changed gradient checkpointing or bf16; the comparison would be unfair")
        ds = self.trainer.train_dataset
        for i in range(min(len(ds), 64)):
            p, c, r = (len(ds[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            if p + c != args.seq_len or p + r != args.seq_len:
                raise SystemExit(f"TRL tokenised row {i} to {p}+{c} / {p}+{r} tokens, not {args.seq_len}; the data is off")

    def run(self) -> tuple[float, float]:
        """(seconds for the steps after the warm-up, mean training loss of the round)."""
        out = self.trainer.train()
        # times[0]: training begins; times[k]: step k ends. Time from the end of the warm-up.
        return self.times[-1] - self.times[self.args.warmup], float(out.training_loss)


# ----- the run ----------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    require_trl()
    import jax
    import torch
    import transformers
    import trl

    import warnings

    import datasets

    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    ncpu = os.cpu_count() or 1
    torch.set_num_threads(ncpu)
    print(f"machine: {ncpu} CPUs, {cpu_model()}; load average {os.getloadavg()[0]:.2f}; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, trl {trl.__version__}")
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    if gpu:
        peaks = gpu_peaks(gpu)
        if peaks is None:
            sys.exit(f"bench_train.py: no peak bfloat16 rate known for {gpu}; add it to bench/machine.py's GPU_PEAKS")
        rates = {"jax": peaks[0]}
        print(f"GPU: {gpu}, dense bfloat16 peak {peaks[0] / 1e12:.0f} TFLOP/s (data sheet)")
    else:
        rates = matmul_rates(args.matmul_n)
        print(f"float32 matmul {args.matmul_n}x{args.matmul_n}: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()))

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    folder = work / "model"
    tok, n_params, n_matmul = build_folder(args, folder)
    rows_needed = args.batch_size * (1 + args.rounds * (args.steps + args.warmup + 1))
    ours, theirs = make_rows(args, max(rows_needed, 4 * args.batch_size))
    data_file = work / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ours))
    tokens = args.batch_size * 2 * args.seq_len
    print(f"model: {args.shape or f'llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} mlp={args.intermediate} vocab={args.vocab}'}: "
          f"{n_params / 1e6:.1f}M parameters, {args.dtype}")
    print(f"DPO sigmoid beta 0.1 with a reference model, batch {args.batch_size} pairs x 2 x {args.seq_len} tokens "
          f"= {tokens} tokens/step; {args.rounds} round(s) of {args.steps} timed steps per side\n")

    t = time.perf_counter()
    ja = JaxSide(args, folder, data_file, work / "jax_out", total_steps=1 + args.rounds * args.steps)
    print(f"jaxalign: built in {time.perf_counter() - t - ja.first_step_s:.1f} s; first step (compile + run) "
          f"{ja.first_step_s:.1f} s, loss {ja.first_loss:.4f}")
    t = time.perf_counter()
    tr = TRLSide(args, folder, theirs, work / "trl_out")
    print(f"TRL: built in {time.perf_counter() - t:.1f} s")

    best = {"jaxalign": (math.inf, 0.0), "TRL": (math.inf, 0.0)}
    for r in range(args.rounds):
        for name, fn in (("jaxalign", lambda: ja.run(args.steps)), ("TRL", tr.run)):
            secs, loss = fn()
            print(f"round {r + 1}: {name:8s} {secs / args.steps:7.3f} s/step  {tokens * args.steps / secs:9.1f} tokens/s  "
                  f"loss {loss:.4f}  (load {os.getloadavg()[0]:.2f})")
            if secs < best[name][0]:
                best[name] = (secs, loss)

    flops_per_step = 4 * tokens * (2 * n_matmul + 4 * args.layers * args.seq_len * args.hidden)
    peak = rates["jax"]
    results = {}
    print(f"\nmodel FLOPs per step {flops_per_step / 1e9:.1f} GFLOP; MFU against "
          f"{'the GPU peak' if gpu else 'the jax matmul rate'} {peak / 1e9:.1f} GFLOP/s\n")
    print(f"| {'':8s} | {'s/step':>7s} | {'tokens/s':>9s} | {'GFLOP/s':>8s} | {'MFU':>6s} | {'compile s':>9s} |")
    print(f"|{'-' * 10}|{'-' * 9}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 11}|")
    for name, (secs, loss) in best.items():
        sps = secs / args.steps
        flops = flops_per_step / sps
        results[name] = {"seconds_per_step": sps, "tokens_per_second": tokens / sps, "flops_per_second": flops,
                         "mfu": flops / peak, "loss": loss}
        compile_s = f"{ja.first_step_s - sps:9.1f}" if name == "jaxalign" else f"{'-':>9s}"
        print(f"| {name:8s} | {sps:7.3f} | {tokens / sps:9.1f} | {flops / 1e9:8.1f} | {100 * flops / peak:5.1f}% | {compile_s} |")
    ratio = results["jaxalign"]["tokens_per_second"] / results["TRL"]["tokens_per_second"]
    print(f"\njaxalign / TRL throughput: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "params": n_params, "matmul_params": n_matmul, "tokens_per_step": tokens,
            "flops_per_step": flops_per_step, "matmul_flops_per_second": rates,
            "jaxalign_first_step_seconds": ja.first_step_s, "results": results, "ratio": ratio,
        }, indent=2))


if __name__ == "__main__":
    main()
