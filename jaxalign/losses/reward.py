"""Reward-model (Bradley-Terry) loss, as TRL's ``RewardTrainer`` computes it."""

from __future__ import annotations

import jax.numpy as jnp
from jax.nn import log_sigmoid

__all__ = ["reward_loss"]


def reward_loss(chosen_scores, rejected_scores, *, margin=None, center_rewards_coefficient=None):
    """Bradley-Terry pairwise reward loss (Ouyang et al. 2022; margin from Llama 2, Touvron 2023).

    ``loss = mean(-log_sigmoid(r_c - r_r - margin))``, plus
    ``center_rewards_coefficient * mean((r_c + r_r)^2)`` when the coefficient is set
    (Eisenstein et al. 2023 reward centring). ``margin`` is a scalar or ``[B]`` array, or None.
    Scores are ``[B]`` (a trailing axis of size 1 is accepted). Returns a scalar.
    """
    chosen = jnp.asarray(chosen_scores)
    rejected = jnp.asarray(rejected_scores)
    if chosen.ndim == 2 and chosen.shape[-1] == 1:
        chosen = chosen[:, 0]
    if rejected.ndim == 2 and rejected.shape[-1] == 1:
        rejected = rejected[:, 0]
    diff = chosen - rejected
    if margin is not None:
        diff = diff - jnp.asarray(margin, dtype=diff.dtype)
    loss = jnp.mean(-log_sigmoid(diff))
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * jnp.mean((chosen + rejected) ** 2)
    return loss
