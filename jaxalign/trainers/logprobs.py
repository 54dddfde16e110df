"""Per-token log-probabilities of the tokens a sequence actually contains (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits: jax.Array, input_ids: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``; ``out[:, 0] = 0``.

    ``logits`` [B, T, V] are the model's outputs at every position; position t-1 predicts
    token t. Computed as gathered logit minus logsumexp, without a [B, T, V] log-softmax.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.pad(logps, ((0, 0), (1, 0)))


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of the next-token distribution predicting token t, aligned like :func:`token_logps`."""
    logits = logits[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.pad(ent, ((0, 0), (1, 0)))


def sequence_logps(token_lp: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over response tokens, number of response tokens) per row."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_lp * mask, axis=-1), jnp.sum(mask, axis=-1)


def mean_logits_on_labels(logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-row mean over response positions of the vocabulary-mean logit (TRL's ``logits/*`` metric)."""
    mask = loss_mask[:, 1:].astype(jnp.float32)
    per_pos = jnp.mean(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.sum(per_pos * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
