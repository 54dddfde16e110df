"""PPO math (Schulman et al. 2017) as TRL's PPOv2 ``PPOTrainer`` computes it.

Per-token arrays are ``[B, T]`` over response positions, with a float ``mask`` ``[B, T]``
(1 on response tokens, 0 on padding). Masked means divide by ``max(mask.sum(), 1)``, so an
all-masked batch or row gives 0, never NaN. Output dtype equals input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxalign.losses.preference import _check_hparam

__all__ = [
    "masked_mean",
    "masked_var",
    "whiten",
    "compute_gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "kl_penalty_rewards",
]


def masked_mean(x, mask, axis=None):
    """``sum(x * mask) / max(sum(mask), 1)`` over ``axis`` (all axes when None)."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask, *, unbiased=True):
    """Masked variance over all elements, with Bessel's ``n / (n - 1)`` correction (TRL's ``masked_var``)."""
    mask = mask.astype(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def whiten(x, mask, *, shift_mean=True):
    """Masked whitening (TRL ``masked_whiten``): ``(x - mean) / sqrt(var + 1e-8)``.

    Mean and unbiased variance are taken over the masked elements of the whole batch; with
    ``shift_mean=False`` the mean is added back. Positions outside ``mask`` are set to 0 (TRL
    follows every ``masked_whiten`` with this ``masked_fill``).
    """
    x = jnp.asarray(x)
    mask = jnp.asarray(mask).astype(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def compute_gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalized Advantage Estimation (Schulman et al. 2016), reversed ``lax.scan`` over T.

    ``delta_t = r_t + gamma V_{t+1} - V_t``; ``A_t = delta_t + gamma lam A_{t+1}``; ``A_T = 0``
    past the end; ``returns = A + V``. Rewards and values outside ``mask`` are treated as 0,
    so the state after a row's last response token is terminal. Returns
    ``(advantages, returns)``, both ``[B, T]`` and 0 outside ``mask``. (Whitening of the
    advantages is a separate call to :func:`whiten`.)
    """
    values = jnp.asarray(values)
    mask = jnp.asarray(mask).astype(values.dtype)
    rewards = jnp.asarray(rewards).astype(values.dtype) * mask
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(lastgaelam, delta_t):
        adv = delta_t + gamma * lam * lastgaelam
        return adv, adv

    _, adv_t = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = adv_t.T * mask
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(logps, old_logps, advantages, mask, *, cliprange: float = 0.2):
    """PPO clipped surrogate (Schulman et al. 2017), TRL PPOv2.

    ``ratio = exp(logp - old_logp)``; per token ``max(-A ratio, -A clip(ratio, 1-eps, 1+eps))``,
    masked mean over the batch. The exponential is evaluated on the already-clipped side in log
    space, so a clipped token with a huge log-ratio yields a zero gradient, never ``0 * inf``.
    Returns ``(loss, clipfrac, approx_kl)``: ``clipfrac`` is the masked fraction of tokens where
    the clipped term is active, ``approx_kl = 0.5 * masked_mean((logp - old_logp)^2)``
    (TRL takes that mean unmasked; here padding is excluded). Metrics are stop-gradient.
    """
    _check_hparam("cliprange", cliprange, low=0.0, high=1.0, high_open=True)
    logps = jnp.asarray(logps)
    dtype = logps.dtype
    mask = jnp.asarray(mask).astype(dtype)
    advantages = jnp.asarray(advantages).astype(dtype)
    old_logps = jax.lax.stop_gradient(jnp.asarray(old_logps).astype(dtype))
    log_ratio = logps - old_logps
    lo, hi = math.log1p(-cliprange), math.log1p(cliprange)
    # max(-A r, -A clip(r)) == -A * min(r, 1+eps) for A >= 0 and -A * max(r, 1-eps) for A < 0.
    pos = advantages >= 0
    eff_log_ratio = jnp.where(pos, jnp.minimum(log_ratio, hi), jnp.maximum(log_ratio, lo))
    per_token = -advantages * jnp.exp(eff_log_ratio)
    loss = masked_mean(per_token, mask)

    lr_sg = jax.lax.stop_gradient(log_ratio)
    ratio = jnp.exp(lr_sg)
    clipped = ((advantages > 0) & (ratio > 1.0 + cliprange)) | (
        (advantages < 0) & (ratio < 1.0 - cliprange)
    )
    clipfrac = masked_mean(clipped.astype(dtype), mask)
    approx_kl = 0.5 * masked_mean(lr_sg**2, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(values, old_values, returns, mask, *, cliprange_value: float = 0.2):
    """Clipped value loss (PPO2 baselines, TRL PPOv2).

    ``V_clip = clip(V, V_old - c, V_old + c)``; loss ``0.5 * masked_mean(max((V - R)^2,
    (V_clip - R)^2))`` (the trainer multiplies by ``vf_coef``). Returns ``(loss, clipfrac)``
    with ``clipfrac`` the masked fraction where the clipped error is the larger one.
    """
    _check_hparam("cliprange_value", cliprange_value, low=0.0)
    values = jnp.asarray(values)
    dtype = values.dtype
    mask = jnp.asarray(mask).astype(dtype)
    old_values = jax.lax.stop_gradient(jnp.asarray(old_values).astype(dtype))
    returns = jax.lax.stop_gradient(jnp.asarray(returns).astype(dtype))
    v_clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
    clipfrac = masked_mean(jax.lax.stop_gradient(l2 > l1).astype(dtype), mask)
    return loss, clipfrac


def kl_penalty_rewards(logps, ref_logps, scores, mask, *, kl_coef: float = 0.05):
    """Per-token RLHF rewards (Ziegler et al. 2019; TRL PPOv2 with the k1 estimator).

    ``r_t = -kl_coef * (logp_t - ref_logp_t)`` on response tokens, plus the sequence score
    ``scores[b]`` at each row's last response token (last index where ``mask == 1``); 0 outside
    ``mask``; rows with no response token get no score. Returns ``[B, T]`` (stop-gradient).
    """
    logps = jnp.asarray(logps)
    dtype = logps.dtype
    mask = jnp.asarray(mask).astype(dtype)
    kl = logps - jnp.asarray(ref_logps).astype(dtype)
    rewards = -kl_coef * kl * mask
    T = mask.shape[1]
    has_any = jnp.sum(mask, axis=1) > 0
    last = T - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
    onehot = (jnp.arange(T)[None, :] == last[:, None]) & has_any[:, None]
    rewards = rewards + onehot.astype(dtype) * jnp.asarray(scores).astype(dtype)[:, None]
    return jax.lax.stop_gradient(rewards)
