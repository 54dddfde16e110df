"""Fresh random-weight models (the demo's tiny Llama; tests and benchmarks)."""

from __future__ import annotations

from flax import nnx

from jaxalign.models.config import ModelConfig
from jaxalign.models.decoder import Decoder


def llama_config(vocab_size: int, *, hidden_size: int = 128, num_hidden_layers: int = 4, num_attention_heads: int = 4,
                 num_key_value_heads: int = 2, intermediate_size: int | None = None, max_position_embeddings: int = 512,
                 tie_word_embeddings: bool = True, pad_token_id=None, bos_token_id=None, eos_token_id=None) -> ModelConfig:
    """A Llama-architecture config of the given size."""
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def random_model(config: ModelConfig, seed: int = 0, dtype="float32") -> Decoder:
    """A Decoder with freshly initialised weights (normal(0, 0.02) matrices, unit norms)."""
    return Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed))
