"""Shared test helpers: tiny model folders and tokenizers, data files, option sets, float64 references
and one-line error checks. Fixtures (``char_tokenizer``, ``tiny_model_dir``, ``x64``) live in conftest.py.

Ids of the default char tokenizer: <|pad|>=0, <|im_start|>=1, <|im_end|>=2,
<|endoftext|>=3, <|unk|>=4, '0'..'9'=5..14, 'a'..'z'=15..40, ' '=41, '+'=42, '='=45, '\\n'=57.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from jaxalign.config import resolve
from jaxalign.convert import save_hf_model
from jaxalign.demo import build_char_tokenizer, make_addition_rows
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.demo.tiny_tokenizer import DEFAULT_CHARS, SPECIAL_TOKENS



# ----- training-core tests: a tiny base model, data and options --------------------------------
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Tiny Llama: every dimension divides an fsdp=4 x tensor=2 mesh (vocab 80 > the tokenizer's 69 ids).
MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=128)
VOCAB = 80

# Options every test run shares: short sequences in two buckets, one device, no remat, logs every step.
TINY = dict(
    max_length=64, length_buckets="32,64", gradient_checkpointing=False, mesh="data=1,fsdp=1,tensor=1",
    learning_rate=1e-3, lr_scheduler_type="cosine", warmup_ratio=0.0, weight_decay=0.0,
    per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, save_steps=1000, seed=0,
)


def tiny_model_dir(path, seed: int = 0, *, vocab_size: int = VOCAB, **dims) -> str:
    """A tiny random-weight Llama Hugging Face folder with the char tokenizer saved beside it; returns its path.
    ``dims`` override :data:`MODEL`."""
    tok = build_char_tokenizer()
    cfg = llama_config(vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **{**MODEL, **dims})
    save_hf_model(random_model(cfg, seed=seed), path, tokenizer=tok)
    return str(path)


def make_base(path, seed: int = 0) -> str:
    """The training-core tests' tiny Llama (every dimension divides an fsdp=4 x tensor=2 mesh)."""
    return tiny_model_dir(path, seed)


def short_rows(n: int, seed: int = 0) -> list[dict]:
    """Addition rows of 26-30 tokens (bucket 32)."""
    return make_addition_rows(n, seed=seed, digits=(1, 2))


def long_rows(n: int, seed: int = 0) -> list[dict]:
    """Addition rows with a system turn, 39-46 tokens (bucket 64)."""
    return make_addition_rows(n, seed=seed, digits=(1, 3), system="add")


def write_jsonl(path, rows) -> str:
    """Rows (dicts, or raw strings written as they are) one per line."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sft_config(**flags):
    """A resolved SFT config: TINY, then ``flags``."""
    return resolve("sft", None, {**TINY, **flags})


def cli_args(options: dict) -> list[str]:
    """{"max_steps": 3} -> ["--max_steps", "3"]."""
    out = []
    for k, v in options.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def hf_logits(folder, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] from transformers on a Hugging Face folder (float32, right-padded rows)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids, np.int64)),
                    attention_mask=torch.as_tensor(np.asarray(attention_mask, np.int64)))
    return out.logits.numpy()


def reference_nll(logits: np.ndarray, input_ids: np.ndarray, loss_mask: np.ndarray) -> tuple[float, float]:
    """(token-mean NLL, token accuracy) over the response tokens, by a float64 log-softmax.

    Position t-1 predicts token t; ``loss_mask[:, t]`` marks token t as a response token.
    """
    lg = np.asarray(logits, np.float64)[:, :-1]
    targets = np.asarray(input_ids)[:, 1:]
    mask = np.asarray(loss_mask, np.float64)[:, 1:]
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    tokens = mask.sum()
    acc = ((lg.argmax(-1) == targets) * mask).sum() / tokens
    return float(-(picked * mask).sum() / tokens), float(acc)


def one_error_line(err: str) -> str:
    """The single line the CLI wrote to stderr (asserting there is exactly one)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("jaxalign: error: "), lines[0]
    return lines[0]


# ----- algorithm tests (KTO, RM, GRPO, PPO) -------------------------------------------------------
def make_model_dir(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer Llama folder over the char tokenizer's own vocabulary (the KTO, RM and GRPO tests)."""
    tok = build_char_tokenizer()
    return Path(tiny_model_dir(path, seed, vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                               max_position_embeddings=512))


def conv(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def config(model_dir, dataset, out, **over):
    """rlhf options for a fast single-device run (gradient checkpointing off, fixed buckets)."""
    flags = dict(model=str(model_dir), dataset=str(dataset), output_dir=str(out), mesh="data=1,fsdp=1,tensor=1",
                 gradient_checkpointing=False, max_length=48, length_buckets="48", logging_steps=1,
                 save_steps=1000, lr_scheduler_type="constant", weight_decay=0.0)
    flags.update(over)
    return resolve("rlhf", None, flags)


def np_token_logps(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log p(ids[:, t] | ids[:, :t]) from logits [B, T, V] with numpy; column 0 is 0."""
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    out = np.zeros(ids.shape, np.float64)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            out[b, t] = logits[b, t - 1, ids[b, t]] - logz[b, t - 1]
    return out


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def compiled_call(model, method: str = "__call__"):
    """A plain (no loss, no grad) forward of ``model`` compiled once: f(ids, attention_mask) -> numpy."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, attn: getattr(nnx.merge(graphdef, s), method)(ids, attn))
    return lambda ids, attn: np.asarray(fn(state, ids, attn))


# ----- foundation tests: parity with transformers, KV cache, conversion, sharding ---------------
# transformers' default initializer_range (0.02) makes attention scores ~0 in tiny random models, so
# attention is nearly uniform and RoPE barely moves the logits (~1e-4): a parity test at 1e-4 could
# then miss a RoPE or masking bug. With 0.2 the attention is sharp (RoPE scaling moves logits by ~0.7).
SHARP = dict(initializer_range=0.2)

# Dimensions divisible by 8 so every sharded dimension really splits on 8 simulated devices.
SHARDABLE = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128)


def padded_batch(lengths, width: int, side: str, *, vocab: int = 97, seed: int = 0):
    """(ids [B, width] int32, mask [B, width] int32) with real tokens of the given lengths.

    Padding slots hold random junk ids (not the pad id), so only the mask can hide them.
    """
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(len(lengths), width)).astype(np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n :] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def hf_row_logits(hf_model, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Hugging Face logits of each row's real tokens, run alone without any padding (the reference)."""
    out = []
    with torch.no_grad():
        for row, m in zip(ids, mask):
            real = torch.tensor(row[m.astype(bool)], dtype=torch.long)[None]
            out.append(hf_model(input_ids=real).logits[0].numpy())
    return out


def max_diff_real(logits: np.ndarray, ref_rows: list[np.ndarray], mask: np.ndarray) -> float:
    """Largest |logits - reference| over the real (unpadded) positions of every row."""
    worst = 0.0
    for row_logits, ref, m in zip(np.asarray(logits), ref_rows, mask):
        got = row_logits[m.astype(bool)]
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def tiny_tokenizer():
    """A word-level fast tokenizer with a chat template, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "the", "cat", "sat", "user", "assistant"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}",
    )


def rewrite_config(folder: Path, **changes) -> None:
    """Edit keys of a model folder's config.json in place."""
    cfg_file = Path(folder) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


def assert_state_dicts_identical(a: dict, b: dict) -> None:
    """Same tensor names and torch.equal (bit-identical) values."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@nnx.jit
def forward(model, ids, mask=None, positions=None):
    """model(ids, mask, positions) compiled once per model and shape: much faster than eager dispatch."""
    return model(ids, mask, positions)


@nnx.jit
def cached_forward(model, ids, mask, cache):
    """model(ids, mask, cache=cache) compiled once per model and shape, as the sampler runs it."""
    return model(ids, mask, cache=cache)


# ----- the char tokenizer's ids, by hand ---------------------------------------------------------
PAD, IM_START, IM_END, ENDOFTEXT, UNK = range(5)
_SPECIAL = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

_TOKENIZER = None


def tokenizer() -> Any:
    """A shared instance of the default char tokenizer (building one takes a few ms)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_char_tokenizer()
    return _TOKENIZER


def ids(*parts: str | int) -> list[int]:
    """Expected ids: strings are spelled char by char (special-token names map whole), ints pass."""
    out: list[int] = []
    for part in parts:
        if isinstance(part, int):
            out.append(part)
        elif part in _SPECIAL:
            out.append(_SPECIAL[part])
        else:
            out.extend(len(SPECIAL_TOKENS) + DEFAULT_CHARS.index(ch) for ch in part)
    return out


def chatml(*turns: tuple[str, str]) -> list[int]:
    """Expected ids of ChatML turns ``(role, content)``, each ending ``<|im_end|>\\n``."""
    out: list[int] = []
    for role, content in turns:
        out += ids(IM_START, role + "\n" + content, IM_END, "\n")
    return out


def here() -> str:
    return os.path.dirname(os.path.abspath(__file__))


# ----- tiny random-weight transformers models of each supported family --------------------------
BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class name, overrides). Covers GQA, tied/untied, qkv bias, q/k norm, llama3 rope, and the
# three Gemma families.
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3_rope_tied": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64),
        ),
    ),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=16, num_attention_heads=4)),
    # Gemma: head_dim (16) apart from hidden / heads (8), GeGLU, tied, (1 + w) norms, sqrt(hidden) embeddings.
    "gemma": ("GemmaConfig", dict(head_dim=16, hidden_act="gelu_pytorch_tanh")),
    # Gemma 2: small soft caps that bite at SHARP's scale, a query_pre_attn_scalar unlike head_dim, layer 0
    # sliding (window 4) and layer 1 global, sandwich norms.
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0, sliding_window=4)),
    # Gemma 3 text: q/k norm, sliding layer 0 with its own (tiny) RoPE base, global layer 1 with linear scaling.
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}})),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random-weight transformers causal LM (float32, eval mode) of the given family."""
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random norms and biases too, so that a wrong mapping of any tensor shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save_hf_model_dir(family: str, path, seed: int = 0, **overrides):
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    return model



def assert_merged_equals_peft(merged_folder, peft_model) -> dict:
    """The merged export in ``merged_folder`` (``jaxalign export --merge_lora true``) equals PEFT's
    ``merge_and_unload()`` of ``peft_model`` tensor by tensor (1e-5; a tied lm_head may be absent). Returns
    the export's tensors."""
    from safetensors.numpy import load_file

    ours = load_file(str(Path(merged_folder) / "model.safetensors"))
    theirs = {k: v.detach().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    for name, value in theirs.items():
        if name == "lm_head.weight" and name not in ours:
            continue  # tied
        np.testing.assert_allclose(ours[name], value, atol=1e-5, rtol=0, err_msg=name)
    return ours


def per_completion_rows(arrays: dict) -> dict:
    """A GRPO generation's update arrays in the plain layout, one prompt + completion sequence per completion,
    from the shared-prefix layout (``input_ids`` [N / k, P + k C]: each prompt once, then k completions),
    written out here with numpy so the tests' formulas run on sequences of their own."""
    n, c = arrays["completion_mask"].shape
    r, width = arrays["input_ids"].shape
    k = n // r
    p = width - k * c
    out = dict(arrays)
    for key in ("input_ids", "attention_mask"):
        a = np.asarray(arrays[key])
        out[key] = np.concatenate([np.repeat(a[:, :p], k, axis=0), a[:, p:].reshape(n, c)], axis=1)
    return out


def per_reply_batch(batch: dict) -> dict:
    """A DPO batch as a sequence per reply (``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask``,
    and the same for rejected, [..., P + R]): a shared-prefix batch (``input_ids`` [..., P + 2R], each prompt
    once, left-padded, then the two replies) has its prompt copied before each reply; a plain batch is returned
    (or any other batch) is returned as it is. The tests' own formulas run on these sequences."""
    if "input_ids" not in batch or "chosen_loss_mask" not in batch:
        return batch
    r = batch["chosen_loss_mask"].shape[-1]
    ids, attn = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    p = ids.shape[-1] - 2 * r
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    for j, side in enumerate(("chosen", "rejected")):
        reply = slice(p + j * r, p + (j + 1) * r)
        out[f"{side}_input_ids"] = np.concatenate([ids[..., :p], ids[..., reply]], axis=-1)
        out[f"{side}_attention_mask"] = np.concatenate([attn[..., :p], attn[..., reply]], axis=-1)
        loss = np.asarray(batch[f"{side}_loss_mask"], np.float32)
        out[f"{side}_loss_mask"] = np.concatenate([np.zeros(loss.shape[:-1] + (p,), np.float32), loss], axis=-1)
    return out
