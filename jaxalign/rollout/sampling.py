"""Pure logit processing for sampling: repetition penalty, temperature, top-k, top-p.

All functions take float32 logits [B, V] and return logits of the same shape, with filtered
tokens set to ``-inf``. They follow Hugging Face's processors and their order in
``generate``: repetition penalty first, then temperature, top-k, top-p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Hugging Face's rule: for tokens already present (``seen`` [B, V] bool), divide a positive
    logit by ``penalty`` and multiply a negative one by it."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """logits / temperature (temperature > 0)."""
    if temperature == 1.0:
        return logits
    return logits / jnp.float32(temperature)


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep the ``k`` largest logits per row (ties with the k-th value are kept, as in HF)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filtering: keep the smallest set of most-probable tokens whose probability
    reaches ``p`` (a token is kept when the mass of the tokens ranked above it is < p; the
    most likely token is always kept)."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    # Scatter the decision back to vocabulary order.
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, NEG_INF)


def process_logits(
    logits: jax.Array,
    seen: jax.Array | None,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
) -> jax.Array:
    """The sampling distribution's logits (greedy callers take the argmax of the result)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:  # greedy: only the argmax matters
        return logits
    logits = apply_temperature(logits, temperature)
    logits = apply_top_k(logits, top_k)
    return apply_top_p(logits, top_p)


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (the first of tied maxima) as int32, for rows without NaN: the row maximum, then the
    lowest index holding it. Two plain reductions; XLA:CPU runs argmax's paired (value, index) reduction ~3.5x
    slower over a 32000-token vocabulary (4.7 vs 1.3 ms at 64 rows), once per decode step."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1] - 1), axis=-1)


def select_tokens(processed: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """Argmax when ``temperature == 0``, else one draw per row from softmax(processed): the Gumbel-max draw of
    ``jax.random.categorical`` (the same noise, so the same tokens), taken with :func:`first_argmax`."""
    if temperature <= 0:
        return first_argmax(processed)
    return first_argmax(processed + jax.random.gumbel(key, processed.shape, processed.dtype))


def token_logps(raw_logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """log softmax(raw_logits / T)[token] in float32, with T = 1 for greedy (``temperature == 0``).

    These are the policy log-probs PPO/GRPO use in the loss (as TRL and ms-swift compute them):
    the model's own distribution at the sampling temperature, not renormalised over the
    top-k/top-p set and without the repetition penalty.
    """
    t = 1.0 if temperature <= 0 else float(temperature)
    scaled = raw_logits.astype(jnp.float32) / jnp.float32(t)
    picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(scaled, axis=-1)
