"""The decoder (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text), its configuration and KV cache."""

from jaxalign.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, config_from_hf
from jaxalign.models.decoder import Decoder
from jaxalign.models.kv_cache import KVCache, init_cache
from jaxalign.models.value_head import RewardModel, ValueHead


def __getattr__(name):  # loading reads folders (jaxalign.convert), which imports this package: resolve lazily
    if name == "load_reward_model":
        from jaxalign.convert.reward_model import load_reward_model

        return load_reward_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "config_from_hf", "Decoder", "KVCache", "init_cache",
           "RewardModel", "ValueHead", "load_reward_model"]
