"""PPO's compiled pieces: the policy+value module, the rollout forward, and the update.

Sequences are ``query_response`` [B, P+C]: a left-padded prompt of P tokens followed by C
sampled tokens. Position ``P-1+t`` predicts response token ``t``, so log-probs and values of
the response are read at positions ``P-1 .. P+C-2`` (TRL's ``[:, context_length - 1 : -1]``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.losses import compute_gae, kl_penalty_rewards, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from jaxalign.models.decoder import Decoder
from jaxalign.models.value_head import RewardModel
from jaxalign.trainers.logprobs import completion_logps


class PolicyAndValue(nnx.Module):
    """The two trained models of PPO in one module, so one optimizer updates both in one step."""

    def __init__(self, policy: Decoder, value: RewardModel):
        self.policy = policy
        self.value = value

    @property
    def config(self):
        return self.policy.config


def response_values(value_model: RewardModel, ids, mask, prompt_len: int):
    """The value before each response token: [B, C]."""
    return value_model.values(ids, mask)[:, prompt_len - 1 : -1]


def rollout_forward(models: PolicyAndValue, ref_policy: Decoder, reward_model: RewardModel, ids, mask,
                    prompt_len: int, temperature: float):
    """Everything PPO needs from the sampled sequences, with no gradient:
    policy and reference log-probs, values, and reward-model scores (at each row's last real token)."""
    logps, _ = completion_logps(models.policy, ids, mask, prompt_len, temperature)
    ref_logps, _ = completion_logps(ref_policy, ids, mask, prompt_len, temperature)
    values = response_values(models.value, ids, mask, prompt_len)
    scores = reward_model.scores(ids, mask)
    return jax.lax.stop_gradient((logps, ref_logps, values, scores))


def advantages_and_returns(logps, ref_logps, values, scores, response_mask, *, kl_coef, gamma, lam, whiten_rewards):
    """TRL's PPOv2: per-token KL-penalised rewards, optional reward whitening, GAE, whitened advantages."""
    mask = response_mask.astype(jnp.float32)
    rewards = kl_penalty_rewards(logps, ref_logps, scores, mask, kl_coef=kl_coef)
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    advantages = whiten(advantages, mask)
    return rewards, advantages, returns


@dataclasses.dataclass
class PPOUpdate:
    """The clipped policy + value loss for the shared compiled step."""

    cliprange: float
    cliprange_value: float
    vf_coef: float
    temperature: float

    def extra(self):
        return None

    def totals_fn(self, batch):
        rows = batch["response_mask"].shape[0] * batch["response_mask"].shape[1]
        return {"rows": jnp.asarray(rows, jnp.float32)}

    def loss_fn(self, models, micro, totals, extra, rng):
        ids, mask = micro["query_responses"], micro["attention_mask"]
        prompt_len = ids.shape[1] - micro["response_mask"].shape[1]
        rmask = micro["response_mask"].astype(jnp.float32)
        logps, ent = completion_logps(models.policy, ids, mask, prompt_len, self.temperature)
        vpred = response_values(models.value, ids, mask, prompt_len)
        pg_loss, pg_clipfrac, approx_kl = ppo_policy_loss(
            logps, micro["logps"], micro["advantages"], rmask, cliprange=self.cliprange
        )
        vf_loss, vf_clipfrac = ppo_value_loss(
            vpred, micro["values"], micro["returns"], rmask, cliprange_value=self.cliprange_value
        )
        share = rmask.shape[0] / totals["rows"]  # this micro-batch's share of the mini-batch
        ratio = jnp.exp(logps - micro["logps"])
        metrics = {
            "policy/approxkl_avg": approx_kl,
            "policy/clipfrac_avg": pg_clipfrac,
            "loss/policy_avg": pg_loss,
            "loss/value_avg": vf_loss,
            "val/clipfrac_avg": vf_clipfrac,
            "policy/entropy_avg": masked_mean(ent, rmask),
            "val/ratio": masked_mean(ratio, rmask),
        }
        return (pg_loss + self.vf_coef * vf_loss) * share, {k: v * share for k, v in metrics.items()}
