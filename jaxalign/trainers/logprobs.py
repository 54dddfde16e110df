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


def sequence_logps(token_lp: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over response tokens, number of response tokens) per row."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_lp * mask, axis=-1), jnp.sum(mask, axis=-1)


def vocab_mean_logits(logits: jax.Array) -> jax.Array:
    """``out[b, t]`` = the mean over the vocabulary of the logits at position t (float32) [B, T]."""
    return jnp.mean(logits.astype(jnp.float32), axis=-1)


def predicting_positions(token_mask: jax.Array) -> jax.Array:
    """The positions whose logits predict the tokens ``token_mask`` marks: position t-1 for token t.

    Works on any leading shape; the last axis is the sequence."""
    pad = [(0, 0)] * (token_mask.ndim - 1) + [(0, 1)]
    return jnp.pad(token_mask[..., 1:], pad)


def masked_row_sums(values: jax.Array, position_mask: jax.Array) -> jax.Array:
    """Per-row sum of ``values`` [B, T] over the positions ``position_mask`` [B, T] marks."""
    return jnp.sum(values * position_mask.astype(jnp.float32), axis=-1)


def completion_logps(model, input_ids: jax.Array, attention_mask: jax.Array, prompt_len: int,
                     temperature: float) -> tuple[jax.Array, jax.Array]:
    """(log-probs [B, C], entropies [B, C]) of the tokens from ``prompt_len`` on, at ``temperature``.

    Only the C positions that predict those tokens go through the LM head (TRL's ``logits_to_keep``):
    with a large vocabulary and a long prompt, projecting the prompt's positions would be most of
    the work. Greedy sampling (temperature 0) records log-probs at temperature 1, as the sampler does.
    """
    temperature = temperature if temperature > 0 else 1.0
    hidden, _ = model.hidden_states(input_ids, attention_mask)
    logits = model.logits(hidden[:, prompt_len - 1 : -1]).astype(jnp.float32) / temperature
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, input_ids[:, prompt_len:, None], axis=-1)[..., 0]
    logp = logits - log_z[..., None]
    return picked - log_z, -jnp.sum(jnp.exp(logp) * logp, axis=-1)
