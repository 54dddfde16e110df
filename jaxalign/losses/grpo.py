"""GRPO math (Shao et al. 2024, DeepSeekMath) with the variants ms-swift/TRL offer.

Group-relative advantages, the clipped surrogate with DAPO's clip-higher and two-sided
clipping, GSPO's sequence-level importance ratio, the k3 KL to the reference and the four
loss normalisations (grpo, bnpo, dr_grpo, dapo). Output dtype equals input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxalign.errors import ConfigError
from jaxalign.losses.preference import _check_hparam

__all__ = [
    "SCALE_REWARDS",
    "GRPO_LOSS_TYPES",
    "TOKEN_NORMALISED",
    "micro_batch_share",
    "IMPORTANCE_SAMPLING_LEVELS",
    "ADVANTAGE_EPS",
    "group_advantages",
    "gdpo_advantages",
    "grpo_loss",
]

SCALE_REWARDS = ("group", "batch", "none")  # gdpo: per reward function, see gdpo_advantages
GDPO_EPS = 1e-8  # ms-swift's, in both of GDPO's divisions
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# Loss types normalised by the token count of the whole batch; the others by its rows.
TOKEN_NORMALISED = frozenset({"bnpo", "dapo", "cispo"})
# SAPO's ratio is capped at exp(this) before its sigmoid gate: the gate is 1 and its gradient 0 long before, and
# an unbounded exp would make that gradient 0 * inf.
SAPO_LOG_RATIO_CAP = 20.0


def micro_batch_share(loss_type: str, micro_tokens, micro_rows, total_tokens, total_rows):
    """The weight of one micro-batch's loss (normalised within the micro-batch, as :func:`grpo_loss`
    does) in the loss of the whole accumulated batch."""
    if loss_type in TOKEN_NORMALISED:
        return micro_tokens / total_tokens
    return micro_rows / total_rows
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
ADVANTAGE_EPS = 1e-4  # ms-swift's epsilon (its docs' pseudocode says 1e-8; the code uses 1e-4)


def _unbiased_std(x, axis=None):
    n = x.size if axis is None else x.shape[axis]
    if n < 2:  # a single sample has no spread; its centred reward is 0 anyway
        return jnp.zeros_like(jnp.mean(x, axis=axis))
    return jnp.std(x, axis=axis, ddof=1)


def group_advantages(rewards, *, num_generations: int, scale_rewards: str = "group"):
    """GRPO group-relative advantages (Shao et al. 2024): ``A = (r - mean_G(r)) / (std + 1e-4)``.

    ``rewards`` is ``[N]`` with consecutive groups of ``num_generations`` completions of the
    same prompt. ``std`` is the unbiased (N-1) std of the group (``group``), of the whole batch
    (``batch``), or no division at all (``none``, Dr. GRPO). A group whose rewards are all equal
    gets advantage 0. Raises :class:`ConfigError` when ``num_generations`` does not divide N.
    """
    rewards = jnp.asarray(rewards)
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(
            f"unknown scale_rewards {scale_rewards!r}; valid values are: {', '.join(SCALE_REWARDS)}"
        )
    if rewards.ndim != 1:
        raise ConfigError(f"group_advantages expects rewards of shape [N], got {rewards.shape}")
    n = rewards.shape[0]
    g = int(num_generations)
    if g < 1 or n % g != 0:
        raise ConfigError(
            f"the batch of {n} completions is not divisible by num_generations={num_generations}; "
            "choose a batch size (in completions) that is a multiple of num_generations"
        )
    grouped = rewards.reshape(n // g, g)
    centred = (grouped - jnp.mean(grouped, axis=1, keepdims=True)).reshape(n)
    if scale_rewards == "group":
        std = jnp.repeat(_unbiased_std(grouped, axis=1), g)
        return centred / (std + ADVANTAGE_EPS)
    if scale_rewards == "batch":
        return centred / (_unbiased_std(rewards) + ADVANTAGE_EPS)
    return centred


def gdpo_advantages(rewards_per_func, weights, *, num_generations: int):
    """GDPO advantages (ms-swift's ``--scale_rewards gdpo``): each reward function's rewards normalised within
    their group, ``(r_k - mean_G) / (std_G + 1e-8)`` (unbiased std; NaN rewards, of a function that declined a
    row, are left out of the group's statistics and count 0), summed with ``weights``, and the sum normalised
    over the batch, ``(s - mean) / (std + 1e-8)``. ``rewards_per_func`` is ``[N, F]`` in groups of
    ``num_generations`` consecutive rows; returns ``[N]``."""
    r = jnp.asarray(rewards_per_func)
    if r.ndim != 2 or r.shape[1] != len(weights):
        raise ConfigError(f"gdpo_advantages expects rewards [N, {len(weights)}] (one column per weight), got {r.shape}")
    n, g = r.shape[0], int(num_generations)
    if g < 1 or n % g != 0:
        raise ConfigError(f"the batch of {n} completions is not divisible by num_generations={num_generations}")
    grouped = r.reshape(n // g, g, -1)
    mean = jnp.nanmean(grouped, axis=1, keepdims=True)
    std = jnp.nanstd(grouped, axis=1, keepdims=True, ddof=1) if g > 1 else jnp.full_like(mean, jnp.nan)
    normalised = jnp.nan_to_num((grouped - mean) / (std + GDPO_EPS), nan=0.0).reshape(n, -1)
    summed = normalised @ jnp.asarray(weights, normalised.dtype)
    return (summed - jnp.mean(summed)) / (_unbiased_std(summed) + GDPO_EPS)


def grpo_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high=None,
    delta=None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length=None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
):
    """GRPO clipped-surrogate loss (Shao et al. 2024) with DAPO/GSPO/Dr. GRPO/CISPO/SAPO options.

    Per token: ``rho = exp(w)`` with ``w = logp - old_logp`` (``token``), the length-normalised
    sequence log-ratio ``sum(mask * w) / max(sum(mask), 1)`` broadcast over the row (GSPO
    ``sequence``) or ``sg(seq) + logp - sg(logp)`` (``sequence_token``);
    ``L_t = -min(rho' A, clip(rho, 1-eps, 1+eps_high) A)`` with ``rho' = min(rho, delta)`` when
    ``delta`` is set (two-sided clipping) and ``eps_high = epsilon_high or epsilon`` (DAPO
    clip-higher); plus ``beta * KL_t`` with the clamped k3 estimator
    ``d = clip(ref - logp, -20, 20)``, ``KL_t = clip(e^d - d - 1, -10, 10)``.
    Aggregation by ``loss_type``: ``grpo`` mean over rows of the per-row token mean; ``bnpo``
    token sum / token count; ``dr_grpo`` token sum / (B * max_completion_length) (T when None);
    ``dapo`` token sum / global token count, which inside one jit (single process, or a sharded
    global batch) is the same count as ``bnpo``.
    ``cispo`` (MiniMax-M1, as TRL and ms-swift): ``L_t = -sg(min(rho, eps_high)) A logp`` (the ratio clipped, not
    the update; ScaleRL recommends ``epsilon_high`` 5), aggregated as ``dapo``, metric ``cispo_clip_ratio``
    (``rho > eps_high`` and ``A > 0``). ``sapo`` (Soft Adaptive Policy Optimization): ``L_t = -g A`` with the soft
    gate ``g = sigmoid(tau (rho - 1)) 4 / tau``, ``tau = tau_pos`` where ``A > 0`` else ``tau_neg``, aggregated as
    ``grpo``, no clip metrics.

    ``old_logps`` may be None (on-policy: ``stop_gradient(logps)``); ``ref_logps`` may be None
    when ``beta == 0``. ``advantages`` is ``[B]`` (or per-token ``[B, T]``). Returns
    ``(loss, metrics)``; ``metrics`` (stop-gradient scalars) holds ``kl`` (masked token mean of
    ``KL_t``; 0 when ``ref_logps`` is None), ``clip_ratio/low_mean`` (``rho < 1-eps`` and
    ``A < 0``), ``clip_ratio/high_mean`` (``rho > 1+eps_high`` and ``A > 0``) and
    ``clip_ratio/region_mean`` (either), each averaged over the masked tokens (the clipped loss types).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ConfigError(
            f"unknown GRPO loss_type {loss_type!r}; valid loss types are: {', '.join(GRPO_LOSS_TYPES)}"
        )
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ConfigError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; valid values are: "
            f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
        )
    _check_hparam("beta", beta, low=0.0)
    _check_hparam("epsilon", epsilon, low=0.0, high=1.0, high_open=True)
    if epsilon_high is not None:
        _check_hparam("epsilon_high", epsilon_high, low=0.0)
    if delta is not None:
        _check_hparam("delta", delta, low=0.0, low_open=True)
    if max_completion_length is not None:
        _check_hparam("max_completion_length", max_completion_length, low=0, low_open=True)
    _check_hparam("tau_pos", tau_pos, low=0.0, low_open=True)
    _check_hparam("tau_neg", tau_neg, low=0.0, low_open=True)
    if beta != 0 and ref_logps is None:
        raise ConfigError("grpo_loss needs ref_logps when beta != 0 (set beta 0 to train without a reference)")
    logps = jnp.asarray(logps)
    dtype = logps.dtype
    mask = jnp.asarray(mask).astype(dtype)
    if old_logps is None:
        old_logps = logps
    old_logps = jax.lax.stop_gradient(jnp.asarray(old_logps).astype(dtype))
    adv = jnp.asarray(advantages).astype(dtype)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jax.lax.stop_gradient(jnp.broadcast_to(adv, logps.shape))
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    token_count = jnp.sum(mask, axis=1)
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        seq = jnp.sum(log_ratio * mask, axis=1, keepdims=True) / jnp.maximum(token_count, 1.0)[:, None]
        if importance_sampling_level == "sequence":
            log_w = jnp.broadcast_to(seq, logps.shape)
        else:  # sequence_token (GSPO-token)
            log_w = jax.lax.stop_gradient(seq) + logps - jax.lax.stop_gradient(logps)

    # Everything in log space so no exp of an unselected branch can give 0 * inf in the gradient.
    lo, hi = math.log1p(-eps_low), math.log1p(eps_high)
    log_c1 = log_w if delta is None else jnp.minimum(log_w, math.log(delta))
    log_c2 = jnp.clip(log_w, lo, hi)
    # -min(c1 A, c2 A) = -A * min(c1, c2) for A >= 0 and -A * max(c1, c2) for A < 0 (A == 0 takes
    # the bounded side, so a huge ratio times a zero advantage is 0, not NaN).
    log_sel = jnp.where(adv >= 0, jnp.minimum(log_c1, log_c2), jnp.maximum(log_c1, log_c2))
    if loss_type == "cispo":
        clipped_ratio = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), eps_high))
        per_token = -clipped_ratio * adv * logps
    elif loss_type == "sapo":
        tau = jnp.where(adv > 0, tau_pos, tau_neg).astype(dtype)
        rho = jnp.exp(jnp.minimum(log_w, SAPO_LOG_RATIO_CAP))
        per_token = -jax.nn.sigmoid(tau * (rho - 1.0)) * 4.0 / tau * adv
    else:
        per_token = -adv * jnp.exp(log_sel)

    if ref_logps is not None:
        ref_logps = jax.lax.stop_gradient(jnp.asarray(ref_logps).astype(dtype))
        d = jnp.clip(ref_logps - logps, -20.0, 20.0)
        per_token_kl = jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
        if beta != 0:
            per_token = per_token + beta * per_token_kl
    else:
        per_token_kl = None

    total_tokens = jnp.sum(mask)
    masked_sum = jnp.sum(per_token * mask)
    if loss_type in ("grpo", "sapo"):
        loss = jnp.mean(jnp.sum(per_token * mask, axis=1) / jnp.maximum(token_count, 1.0))
    elif loss_type in TOKEN_NORMALISED:
        loss = masked_sum / jnp.maximum(total_tokens, 1.0)
    else:  # dr_grpo
        length = logps.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_sum / (logps.shape[0] * length)

    def tmean(x):
        return jax.lax.stop_gradient(jnp.sum(x * mask) / jnp.maximum(total_tokens, 1.0))

    metrics = {"kl": tmean(per_token_kl) if per_token_kl is not None else jnp.zeros((), dtype)}
    if loss_type == "cispo":
        rho = jnp.exp(jax.lax.stop_gradient(log_w))
        metrics["cispo_clip_ratio"] = tmean(((rho > eps_high) & (adv > 0)).astype(dtype))
    elif loss_type != "sapo":
        coef_1 = jnp.exp(jax.lax.stop_gradient(log_c1))
        low = ((coef_1 < 1.0 - eps_low) & (adv < 0)).astype(dtype)
        high = ((coef_1 > 1.0 + eps_high) & (adv > 0)).astype(dtype)
        metrics["clip_ratio/low_mean"] = tmean(low)
        metrics["clip_ratio/high_mean"] = tmean(high)
        metrics["clip_ratio/region_mean"] = tmean(jnp.maximum(low, high))
    return loss, metrics
