"""Pure-JAX sampler: prefill + decode with a KV cache inside one jit (PPO, GRPO, `infer`)."""

from jaxalign.rollout.generate import Rollout, default_stop_token_ids, generate, trace_count
from jaxalign.rollout.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    token_logps,
)

__all__ = [
    "Rollout", "generate", "trace_count", "default_stop_token_ids", "apply_repetition_penalty",
    "apply_temperature", "apply_top_k", "apply_top_p", "process_logits", "token_logps",
]
