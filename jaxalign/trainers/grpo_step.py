"""The GRPO update as an algorithm for the shared compiled step (:mod:`jaxalign.trainers.step`).

A micro-batch holds prompt+completion sequences ``input_ids`` [B, P+C] with
``attention_mask`` (or, with ``--shared_prefix``, each prompt once with k of its completions: [B / k, P + k C]),
the completion's ``completion_mask`` [B, C] (zeroed for truncated rows
under ``--overlong_filter``), the rollout's ``old_logps`` [B, C] and ``advantages`` [B].
Log-probs are taken with the sampling temperature, as TRL and ms-swift do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.losses.grpo import grpo_loss, micro_batch_share
from jaxalign.trainers import logprobs, shared_prefix


def completion_logps(model, micro, temperature: float):
    """(per-token log-probs [B, C], per-token entropies [B, C]) of a micro-batch's B completions, laid out one
    sequence per completion or k to a row with their prompt once (``input_ids`` [B / k, P + k * C]; see
    :mod:`jaxalign.trainers.shared_prefix`)."""
    rows, c = micro["completion_mask"].shape
    k = rows // micro["input_ids"].shape[0]
    if k == 1:
        prompt_len = micro["input_ids"].shape[1] - c
        return logprobs.completion_logps(model, micro["input_ids"], micro["attention_mask"], prompt_len, temperature)
    temperature = temperature if temperature > 0 else 1.0  # greedy rollouts record log-probs at temperature 1
    out = shared_prefix.completion_stats(model, micro["input_ids"], micro["attention_mask"], (c,) * k,
                                         temperature=temperature, entropy=True)
    return out.logps.reshape(rows, c), out.entropy.reshape(rows, c)


@dataclasses.dataclass
class GRPOUpdate:
    """Hyperparameters of the update; ``ref_params`` only when ``beta > 0``."""

    beta: float
    epsilon: float
    epsilon_high: float | None
    delta: float | None
    loss_type: str
    importance_sampling_level: str
    max_completion_length: int
    temperature: float
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    graphdef: object = None
    rest: object = None
    ref_params: object = None

    def extra(self):
        return self.ref_params

    def totals_fn(self, batch):
        mask = batch["completion_mask"]
        return {
            "rows": jnp.asarray(mask.shape[0] * mask.shape[1], jnp.float32),
            "micro": jnp.asarray(mask.shape[0], jnp.float32),
            "tokens": jnp.maximum(jnp.sum(mask), 1.0),
        }

    def loss_fn(self, model, micro, totals, extra, rng):
        lp, ent = completion_logps(model, micro, self.temperature)
        mask = micro["completion_mask"].astype(jnp.float32)
        ref_lp = None
        if self.beta > 0:
            ref_model = nnx.merge(self.graphdef, extra, self.rest)
            ref_lp, _ = completion_logps(ref_model, micro, self.temperature)
            ref_lp = jax.lax.stop_gradient(ref_lp)
        loss, m = grpo_loss(
            lp, micro["old_logps"], ref_lp, micro["advantages"], mask,
            beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high, delta=self.delta,
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length, tau_pos=self.tau_pos, tau_neg=self.tau_neg,
        )
        weight = micro_batch_share(self.loss_type, jnp.maximum(jnp.sum(mask), 1.0), mask.shape[0],
                                   totals["tokens"], totals["rows"])
        token_w = mask / totals["tokens"]
        drift = jnp.sum(jnp.abs(jax.lax.stop_gradient(lp) - micro["old_logps"]) * token_w)
        # kl and clip ratios are token means whatever the loss type: weigh them by token share
        token_share = jnp.maximum(jnp.sum(mask), 1.0) / totals["tokens"]
        metrics = {k: v * token_share for k, v in m.items()}
        metrics["entropy"] = jnp.sum(ent * token_w)
        metrics["rollout/logp_drift"] = drift
        return loss * weight, metrics
