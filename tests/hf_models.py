"""Tiny random-weight Hugging Face models of each supported family, built offline with transformers."""

from __future__ import annotations

import torch
import transformers

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

# name -> (config class name, overrides). Covers GQA, tied/untied, qkv bias, q/k norm, llama3 rope.
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
