"""Preference-optimisation losses: DPO (and TRL's variants), CPO, SimPO, ORPO, KTO.

All functions take per-example sequence log-probabilities of shape ``[B]`` (sums over the
response tokens unless a docstring says otherwise) and return per-example losses; the trainer
averages them and adds any NLL/RPO term. String options (``loss_type``) and hyperparameters are
static Python values, so every function can be called inside ``jax.jit``. Output dtype equals
input dtype. Formulas follow TRL's ``DPOTrainer.dpo_loss``, ``CPOTrainer.cpo_loss``,
``ORPOTrainer.odds_ratio_loss`` and ``KTOTrainer.kto_loss`` (as used by ms-swift).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.nn import log_sigmoid, sigmoid

from jaxalign.errors import ConfigError

__all__ = [
    "DPO_LOSS_TYPES",
    "CPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "LENGTH_AVERAGED",
    "preference_loss_types",
    "dpo_loss",
    "cpo_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_kl",
    "LOGP_RESOLUTION",
    "clear_wins",
]

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
)
# TRL >= 0.13 renamed ``aot_pair`` to ``aot_unpaired``; accept both spellings.
_DPO_ALIASES = {"aot_unpaired": "aot_pair"}

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # apo_zero_unpaired needs no KL reference point
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")  # simpo: CPO-SimPO (ms-swift's --rlhf_type simpo is this)

# Loss types fed length-averaged log-probs (sums divided by the response length), as TRL does;
# SimPO and ORPO always are. Every other loss type takes sums.
LENGTH_AVERAGED = frozenset({"ipo", "simpo"})


def preference_loss_types(kind: str, loss_type: str | None, loss_weights: str | None):
    """``--loss_type`` and ``--loss_weights`` of a paired algorithm, checked: (types, weights).

    DPO takes several comma- or space-separated types (plus ``sft``, the chosen NLL: MPO) with one
    weight each, aliases resolved; CPO takes one of its four; SimPO and ORPO have their own loss."""
    if kind in ("simpo", "orpo"):
        if loss_type not in (None, "", kind, "sigmoid"):
            raise ConfigError(f"--loss_type {loss_type!r}: {kind} has its own loss; drop the flag")
        return (kind,), (1.0,)
    valid = DPO_LOSS_TYPES if kind == "dpo" else CPO_LOSS_TYPES
    aliases = _DPO_ALIASES if kind == "dpo" else {}
    types = []
    for t in (loss_type or "sigmoid").replace(",", " ").split():
        if kind == "dpo" and t == "sft":
            types.append(t)
        elif t in aliases or t in valid:
            types.append(aliases.get(t, t))
        else:
            names = ", ".join((*valid, *aliases, *(("sft",) if kind == "dpo" else ())))
            raise ConfigError(f"--loss_type {t!r} is not valid for {kind}; choose from {names}")
    if len(types) > 1 and kind != "dpo":
        raise ConfigError(f"--loss_type: only dpo mixes several loss types, {kind} takes one")
    if not loss_weights:
        return tuple(types), (1.0,) * len(types)
    try:
        weights = tuple(float(w) for w in str(loss_weights).replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"--loss_weights {loss_weights!r}: expected numbers, comma-separated") from None
    if len(weights) != len(types):
        raise ConfigError(f"--loss_weights has {len(weights)} values for {len(types)} loss types; give one per type")
    return tuple(types), weights


# Relative resolution of float32 log-prob sums (8 ulps). The reference forward is a separate
# computation from the policy's, so with reference == policy their sums differ in the last bits;
# a reward difference below this, relative to the log-probs it came from, is a tie, not a win.
LOGP_RESOLUTION = 2.0 ** -20


def clear_wins(differences, magnitudes):
    """1.0 where ``differences`` exceeds what float32 resolves at ``magnitudes`` (both ``[B]``), else 0.0.

    ``rewards/accuracies`` counts a pair as correct when its chosen reward beats the rejected one:
    ``differences`` is ``chosen_reward - rejected_reward`` and ``magnitudes`` is ``beta`` times the sum
    of the absolute log-probs behind the two rewards. With reference == policy the rewards are 0 up to
    rounding, and TRL (whose two forwards are bit-identical) logs 0; so does this."""
    differences = jnp.asarray(differences)
    return (differences > LOGP_RESOLUTION * jnp.abs(jnp.asarray(magnitudes))).astype(differences.dtype)


def _check_loss_type(loss_type, valid, what, aliases=None):
    aliases = aliases or {}
    if loss_type in aliases:
        return aliases[loss_type]
    if loss_type not in valid:
        raise ConfigError(
            f"unknown {what} loss_type {loss_type!r}; valid loss types are: {', '.join(valid)}"
        )
    return loss_type


def _check_hparam(name, value, *, low=None, high=None, low_open=False, high_open=False):
    """Raise ConfigError when a Python-number hyperparameter is outside its valid range."""
    if not isinstance(value, (int, float)):
        return  # traced or array-valued hyperparameters are the caller's responsibility
    bad = (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
        or value != value
    )
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        raise ConfigError(f"{name}={value!r} is out of range; it must be in {lo or '(-inf'}, {hi or 'inf)'}")


def _smoothed_sigmoid_loss(x, label_smoothing):
    """-(1-ls) * log_sigmoid(x) - ls * log_sigmoid(-x) (conservative DPO, Mitchell 2023)."""
    losses = -log_sigmoid(x) * (1.0 - label_smoothing)
    if label_smoothing:
        losses = losses - log_sigmoid(-x) * label_smoothing
    return losses


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    discopop_tau: float = 0.05,
    bco_delta=0.0,
):
    """Direct Preference Optimization loss (Rafailov et al. 2023) and TRL's variants.

    With ``lr_c = logp_c - ref_c``, ``lr_r = logp_r - ref_r`` and ``z = lr_c - lr_r``:

    - ``sigmoid``: ``-(1-ls) log s(beta z) - ls log s(-beta z)`` (cDPO label smoothing).
    - ``robust`` (Chowdhury 2024): ``[-(1-ls) log s(beta z) + ls log s(-beta z)] / (1 - 2 ls)``.
    - ``exo_pair`` (EXO, Ji 2024, eq. 16): ``s(bz)(log s(bz) - log(1-ls)) + s(-bz)(log s(-bz) - log ls)``,
      ``ls`` forced to 1e-3 when 0.
    - ``hinge`` (SLiC, Zhao 2023): ``relu(1 - beta z)``.
    - ``ipo`` (Azar 2023, eq. 17): ``(z - 1/(2 beta))^2``. As in TRL, IPO expects
      *length-averaged* log-probs: the caller (trainer) divides each sequence log-prob by its
      number of response tokens before calling with ``loss_type="ipo"``.
    - ``bco_pair`` (BCO, Jung 2024): ``-log s(beta lr_c - delta) - log s(-(beta lr_r - delta))``
      where ``delta = bco_delta`` is the running mean of the rewards kept by the trainer
      (TRL's ``RunningMoments``, updated with ``mean(concat(chosen_rewards, rejected_rewards))``
      *before* the loss is computed); it is treated as a constant.
    - ``sppo_hard`` (SPPO, Wu 2024): ``(lr_c - 1/(2 beta))^2 + (lr_r + 1/(2 beta))^2``.
    - ``nca_pair`` (NCA, Chen 2024): ``-log s(beta lr_c) - 0.5 log s(-beta lr_c) - 0.5 log s(-beta lr_r)``.
    - ``aot`` (AOT, Melnyk 2024, paired): smoothed sigmoid loss on
      ``sort(logp_c - logp_r) - sort(ref_c - ref_r)`` (sorted over the batch).
    - ``aot_pair`` (alias ``aot_unpaired``, TRL's unpaired AOT): smoothed sigmoid loss on
      ``sort(lr_c) - sort(lr_r)``.
    - ``apo_zero`` (APO, D'Oosterlinck 2024, eq. 7): ``1 - s(beta lr_c) + s(beta lr_r)``.
    - ``apo_down`` (APO eq. 8): ``s(beta lr_c) + 1 - s(beta (lr_c - lr_r))``.
    - ``discopop`` (DiscoPOP, Chris Lu 2024, eq. 5): with ``y = beta z``, ``m = s(y / tau)``:
      ``-log s(y) (1 - m) + exp(-y) m``, ``tau = discopop_tau``.

    ``reference_free=True`` treats the reference log-probs as 0 everywhere (uniform reference),
    including the returned rewards. Returns ``(losses, chosen_rewards, rejected_rewards)``, each
    ``[B]``, with rewards ``beta * (logps - ref_logps)`` under ``stop_gradient``. The RPO/SFT
    term is added by the trainer.
    """
    loss_type = _check_loss_type(loss_type, DPO_LOSS_TYPES, "DPO", _DPO_ALIASES)
    _check_hparam("beta", beta, low=0.0, low_open=True)
    _check_hparam("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=loss_type == "robust")
    _check_hparam("discopop_tau", discopop_tau, low=0.0, low_open=True)
    chosen_logps = jnp.asarray(chosen_logps)
    rejected_logps = jnp.asarray(rejected_logps)
    if reference_free:
        ref_chosen_logps = jnp.zeros_like(chosen_logps)
        ref_rejected_logps = jnp.zeros_like(rejected_logps)
    else:
        ref_chosen_logps = jnp.asarray(ref_chosen_logps)
        ref_rejected_logps = jnp.asarray(ref_rejected_logps)

    chosen_lr = chosen_logps - ref_chosen_logps
    rejected_lr = rejected_logps - ref_rejected_logps
    logratios = chosen_logps - rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios
    ls = label_smoothing

    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * logits, ls)
    elif loss_type == "robust":
        losses = (
            -log_sigmoid(beta * logits) * (1.0 - ls) + log_sigmoid(-beta * logits) * ls
        ) / (1.0 - 2.0 * ls)
    elif loss_type == "exo_pair":
        ls = ls if ls else 1e-3
        y = beta * logits
        losses = sigmoid(y) * (log_sigmoid(y) - math.log(1.0 - ls)) + sigmoid(-y) * (
            log_sigmoid(-y) - math.log(ls)
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "bco_pair":
        delta = jax.lax.stop_gradient(jnp.asarray(bco_delta, dtype=chosen_lr.dtype))
        losses = -log_sigmoid(beta * chosen_lr - delta) - log_sigmoid(-(beta * rejected_lr - delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        cr = beta * chosen_lr
        rr = beta * rejected_lr
        losses = -log_sigmoid(cr) - 0.5 * log_sigmoid(-cr) - 0.5 * log_sigmoid(-rr)
    elif loss_type == "aot":
        delta = jnp.sort(logratios, axis=0) - jnp.sort(ref_logratios, axis=0)
        losses = _smoothed_sigmoid_loss(beta * delta, ls)
    elif loss_type == "aot_pair":
        delta = jnp.sort(chosen_lr, axis=0) - jnp.sort(rejected_lr, axis=0)
        losses = _smoothed_sigmoid_loss(beta * delta, ls)
    elif loss_type == "apo_zero":
        losses = (1.0 - sigmoid(beta * chosen_lr)) + sigmoid(beta * rejected_lr)
    elif loss_type == "apo_down":
        losses = sigmoid(beta * chosen_lr) + (1.0 - sigmoid(beta * (chosen_lr - rejected_lr)))
    elif loss_type == "discopop":
        y = beta * logits
        logistic = -log_sigmoid(y)
        # exp(-y) * sigmoid(y / tau), evaluated in log space so it cannot overflow to inf * 0.
        exp_part = jnp.exp(-y + log_sigmoid(y / discopop_tau))
        losses = logistic * sigmoid(-y / discopop_tau) + exp_part
    else:  # pragma: no cover - guarded by _check_loss_type
        raise AssertionError(loss_type)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_lr)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_lr)
    return losses, chosen_rewards, rejected_rewards


def cpo_loss(
    chosen_logps,
    rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 1.0,
):
    """Contrastive Preference Optimization loss (Xu et al. 2024), reference-free DPO.

    With ``z = logp_c - logp_r``: ``sigmoid`` ``-(1-ls) log s(beta z) - ls log s(-beta z)``;
    ``hinge`` ``relu(1 - beta z)``; ``ipo`` ``(z - 1/(2 beta))^2``; ``simpo`` the sigmoid loss of
    ``beta z - simpo_gamma`` (TRL's CPO-SimPO). The caller passes length-averaged log-probs for ``ipo``
    and ``simpo``, as TRL does. The behaviour-cloning NLL term
    (``cpo_alpha``) is added by the trainer. Returns ``(losses, chosen_rewards,
    rejected_rewards)`` with rewards ``beta * logps`` (stop-gradient).
    """
    loss_type = _check_loss_type(loss_type, CPO_LOSS_TYPES, "CPO")
    _check_hparam("beta", beta, low=0.0, low_open=True)
    _check_hparam("label_smoothing", label_smoothing, low=0.0, high=0.5)
    chosen_logps = jnp.asarray(chosen_logps)
    rejected_logps = jnp.asarray(rejected_logps)
    logits = chosen_logps - rejected_logps
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * logits, label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    elif loss_type == "simpo":
        losses = _smoothed_sigmoid_loss(beta * logits - simpo_gamma, label_smoothing)
    else:  # ipo
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logps)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logps)
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    chosen_avg_logps,
    rejected_avg_logps,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
):
    """Simple Preference Optimization loss (Meng et al. 2024) on length-averaged log-probs.

    ``x = beta (avg_logp_c - avg_logp_r) - gamma``; loss ``-(1-ls) log s(x) - ls log s(-x)``
    (TRL's CPOTrainer ``simpo``). ms-swift's default CPO-SimPO adds ``cpo_alpha * NLL`` in the
    trainer. Returns ``(losses, chosen_rewards, rejected_rewards)``, rewards ``beta * avg_logps``
    (stop-gradient).
    """
    _check_hparam("beta", beta, low=0.0, low_open=True)
    _check_hparam("label_smoothing", label_smoothing, low=0.0, high=0.5)
    chosen_avg_logps = jnp.asarray(chosen_avg_logps)
    rejected_avg_logps = jnp.asarray(rejected_avg_logps)
    x = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = _smoothed_sigmoid_loss(x, label_smoothing)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_avg_logps)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_avg_logps)
    return losses, chosen_rewards, rejected_rewards


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) far."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta: float = 0.1):
    """Odds Ratio Preference Optimization loss (Hong et al. 2024); ``beta`` is ORPO's lambda.

    With length-averaged log-probs ``a``: ``log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))``
    (computed with log1p/expm1), per-example ``losses = -beta * log_sigmoid(log_odds)``; the
    trainer adds the chosen NLL. Inputs are clamped to ``<= -1e-12`` so a probability of
    exactly 1 cannot give ``inf``. Returns ``(losses, chosen_rewards, rejected_rewards,
    log_odds_ratio, log_odds_chosen)``: rewards ``beta * avg_logps`` (stop-gradient) of shape
    ``[B]``, and as in TRL the two scalars ``mean(log_sigmoid(log_odds))`` and ``mean(log_odds)``.
    """
    _check_hparam("beta", beta, low=0.0)
    a_c = jnp.minimum(jnp.asarray(chosen_avg_logps), -1e-12)
    a_r = jnp.minimum(jnp.asarray(rejected_avg_logps), -1e-12)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    ratio = log_sigmoid(log_odds)
    losses = -beta * ratio
    chosen_rewards = jax.lax.stop_gradient(beta * jnp.asarray(chosen_avg_logps))
    rejected_rewards = jax.lax.stop_gradient(beta * jnp.asarray(rejected_avg_logps))
    log_odds_ratio = jax.lax.stop_gradient(jnp.mean(ratio))
    log_odds_chosen = jax.lax.stop_gradient(jnp.mean(log_odds))
    return losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen


def kto_kl(policy_kl_logps, ref_kl_logps):
    """KTO reference point z0 (Ethayarajh et al. 2024): ``max(mean(logp_KL - ref_KL), 0)``.

    The inputs are sequence log-probs of mismatched (prompt, completion) pairs; the result is
    a stop-gradient scalar (0 for an empty batch). In multi-process training the mean is over
    the whole global batch; inside one jit with a sharded batch that is automatic.
    """
    policy_kl_logps = jnp.asarray(policy_kl_logps)
    ref_kl_logps = jnp.asarray(ref_kl_logps)
    diff = policy_kl_logps - ref_kl_logps
    n = diff.size
    if n == 0:
        return jnp.zeros((), dtype=diff.dtype)
    kl = jnp.maximum(jnp.mean(diff), 0.0)
    return jax.lax.stop_gradient(kl)


def kto_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    kl,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
):
    """Kahneman-Tversky Optimization loss (Ethayarajh et al. 2024), TRL's ``kto`` loss type; with
    ``loss_type="apo_zero_unpaired"`` the unpaired APO-zero loss (D'Oosterlinck et al. 2024, eq. 7), which has no
    reference point: desirable ``lambda_D (1 - s(beta lr_c))``, undesirable ``lambda_U s(beta lr_r)`` (``kl``
    is ignored; pass 0).

    ``chosen_*`` are the desirable examples ``[Bc]`` and ``rejected_*`` the undesirable ones
    ``[Br]`` of the batch (either may have length 0); ``kl`` is the scalar reference point from
    :func:`kto_kl` (treated as a constant). Desirable: ``lambda_D (1 - s(beta (lr_c - kl)))``;
    undesirable: ``lambda_U (1 - s(beta (kl - lr_r)))``. Returns ``(losses, chosen_rewards,
    rejected_rewards)`` with ``losses = concat(desirable, undesirable)`` of shape ``[Bc + Br]``
    and rewards ``beta * (logps - ref_logps)`` (stop-gradient) of shapes ``[Bc]`` and ``[Br]``.
    """
    _check_hparam("beta", beta, low=0.0, low_open=True)
    _check_hparam("desirable_weight", desirable_weight, low=0.0)
    _check_hparam("undesirable_weight", undesirable_weight, low=0.0)
    loss_type = _check_loss_type(loss_type, KTO_LOSS_TYPES, "KTO")
    chosen_lr = jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps)
    rejected_lr = jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps)
    if loss_type == "apo_zero_unpaired":
        chosen_losses = desirable_weight * (1.0 - sigmoid(beta * chosen_lr))
        rejected_losses = undesirable_weight * sigmoid(beta * rejected_lr)
    else:
        kl = jax.lax.stop_gradient(jnp.asarray(kl, dtype=chosen_lr.dtype))
        chosen_losses = desirable_weight * (1.0 - sigmoid(beta * (chosen_lr - kl)))
        rejected_losses = undesirable_weight * (1.0 - sigmoid(beta * (kl - rejected_lr)))
    losses = jnp.concatenate([chosen_losses.reshape(-1), rejected_losses.reshape(-1)], axis=0)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_lr)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_lr)
    return losses, chosen_rewards, rejected_rewards
