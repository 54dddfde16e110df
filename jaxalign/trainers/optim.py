"""AdamW with ms-swift's schedule options, built from the run's config."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine, linear or constant."""
    peak = cfg.learning_rate
    warmup = int(round(cfg.warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.lr_scheduler_type == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif cfg.lr_scheduler_type == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
    # As Hugging Face's Trainer: no weight decay on biases and norm scales (1-D parameters).
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for AdamW with gradient clipping at ``max_grad_norm``."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.adam_beta1,
            b2=cfg.adam_beta2,
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
