"""Per-token log-probabilities of the tokens a sequence actually contains (float32).

The training losses never build a ``[B, T, V]`` float32 logits array: :func:`head_stats` applies the
LM head to the final hidden states in sequence chunks under ``jax.lax.scan`` with a rematerialised
body, so the forward keeps one chunk's logits at a time and the backward recomputes them chunk by
chunk. Each chunk yields the target token's log-prob and, when asked, the entropy, the vocabulary
mean of the logits (the ``logits/*`` metrics) and the argmax (SFT's ``token_acc``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.parallel.activations import BATCH, EMBED, LENGTH, VOCAB, constrain, features

# Positions per chunk of the LM head. At Llama-3's vocabulary (128256) one row's chunk of float32
# logits is 131 MB.
CHUNK_LEN = 256
# Up to this many logits per row (sequence length x vocabulary, 16 MiB in float32) the head runs in
# one piece with no remat: chunking would only add the backward's recomputation (the demo, the tests).
SINGLE_CHUNK_ELEMENTS = 1 << 22


class HeadStats(NamedTuple):
    """Per-position outputs of :func:`head_stats` ([B, T] each; None when not asked for)."""

    logps: jax.Array
    entropy: jax.Array | None = None
    mean_logits: jax.Array | None = None
    argmax: jax.Array | None = None


def head_chunk_len(length: int, vocab: int, chunk_len: int | None = None) -> int:
    """Positions per chunk for ``length`` positions over ``vocab`` logits: ``chunk_len`` when given,
    else the whole sequence while ``length * vocab <= SINGLE_CHUNK_ELEMENTS``, else ``CHUNK_LEN``."""
    if chunk_len is None:
        chunk_len = length if length * vocab <= SINGLE_CHUNK_ELEMENTS else CHUNK_LEN
    return max(1, min(int(chunk_len), length))


def head_stats(hidden: jax.Array, head: jax.Array | Callable[[jax.Array], jax.Array], targets: jax.Array, *,
               temperature: float = 1.0, entropy: bool = False, mean_logits: bool = False, argmax: bool = False,
               chunk_len: int | None = None) -> HeadStats:
    """From hidden states ``hidden`` [B, T, H] (compute dtype) and the LM head: at each position t,
    ``log softmax(logits[t] / temperature)[targets[b, t]]`` (float32), and optionally the entropy of that
    distribution, the mean over the vocabulary of the raw logits, and their argmax.

    ``head`` is the weight [H, V] (logits ``hidden @ head`` in the compute dtype with float32
    accumulation) or a function from hidden states [B, c, H] to float32 logits [B, c, V], normally
    :meth:`Decoder.logits`, so whatever that projection does (tied weights, sharding, Gemma 2's final
    logit soft-capping) holds per chunk; a bare weight gives uncapped logits.
    The logits exist one chunk of positions at a time (see :func:`head_chunk_len`); T need not be a
    multiple of the chunk (the tail is padded and dropped).
    """
    b, t, h = hidden.shape
    if callable(head):
        project = head
        vocab = jax.eval_shape(head, jax.ShapeDtypeStruct((b, 1, h), hidden.dtype)).shape[-1]
    else:
        # the weight is cast inside the chunk, so in the chunked backward its gradient sums in float32
        def project(hid):
            hid = constrain(hid, features(hid, EMBED))
            logits = jnp.dot(hid, head.astype(hid.dtype), preferred_element_type=jnp.float32)
            return constrain(logits, features(logits, VOCAB))

        vocab = head.shape[-1]
    c = head_chunk_len(t, vocab, chunk_len)

    def chunk(hid, tgt):
        logits = project(hid).astype(jnp.float32)
        scaled = logits / temperature if temperature != 1.0 else logits
        log_z = jax.nn.logsumexp(scaled, axis=-1)
        picked = jnp.take_along_axis(scaled, tgt[..., None], axis=-1)[..., 0]
        out = {"logps": picked - log_z}
        if entropy:
            logp = scaled - log_z[..., None]
            out["entropy"] = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        if mean_logits:
            out["mean_logits"] = jnp.mean(logits, axis=-1)
        if argmax:
            out["argmax"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return out

    if c == t:
        return HeadStats(**chunk(hidden, targets))
    n = -(-t // c)
    pad = n * c - t
    hid = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, h).swapaxes(0, 1)  # [n, B, c, H]
    tgt = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)
    # each chip runs the loop over its own rows (under a mesh; see jaxalign.parallel.activations)
    hid, tgt = constrain(hid, (None, BATCH, LENGTH, EMBED)), constrain(tgt, (None, BATCH, LENGTH))

    def body(carry, xs):
        return carry, chunk(*xs)

    _, ys = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, (hid, tgt))
    return HeadStats(**{k: v.swapaxes(0, 1).reshape(b, n * c)[:, :t] for k, v in ys.items()})


def token_stats(model, input_ids: jax.Array, attention_mask: jax.Array, *, mean_logits: bool = False,
                argmax: bool = False, chunk_len: int | None = None) -> HeadStats:
    """One forward of ``model`` over ``input_ids`` [B, T]: ``logps[b, t] = log p(input_ids[b, t] |
    input_ids[b, :t])`` with ``logps[:, 0] = 0``; when asked for, ``mean_logits[b, t]`` the
    vocabulary-mean logit at position t (every position, the last included) and ``argmax[b, t]`` the
    most likely next token at position t."""
    hidden, _ = model.hidden_states(input_ids, attention_mask)
    # the last position predicts nothing; it goes through the head only for mean_logits / argmax
    keep = input_ids.shape[1] if (mean_logits or argmax) else input_ids.shape[1] - 1
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))[:, :keep]
    out = head_stats(hidden[:, :keep], model.logits, targets, mean_logits=mean_logits, argmax=argmax,
                     chunk_len=chunk_len)
    logps = jnp.pad(out.logps[:, : input_ids.shape[1] - 1], ((0, 0), (1, 0)))
    return out._replace(logps=logps)


def sequence_logps(token_lp: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over response tokens, number of response tokens) per row."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_lp * mask, axis=-1), jnp.sum(mask, axis=-1)


def predicting_positions(token_mask: jax.Array) -> jax.Array:
    """The positions whose logits predict the tokens ``token_mask`` marks: position t-1 for token t.

    Works on any leading shape; the last axis is the sequence."""
    pad = [(0, 0)] * (token_mask.ndim - 1) + [(0, 1)]
    return jnp.pad(token_mask[..., 1:], pad)


def masked_row_sums(values: jax.Array, position_mask: jax.Array) -> jax.Array:
    """Per-row sum of ``values`` [B, T] over the positions ``position_mask`` [B, T] marks."""
    return jnp.sum(values * position_mask.astype(jnp.float32), axis=-1)


def completion_logps(model, input_ids: jax.Array, attention_mask: jax.Array, prompt_len: int,
                     temperature: float, *, chunk_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(log-probs [B, C], entropies [B, C]) of the tokens from ``prompt_len`` on, at ``temperature``.

    Only the C positions that predict those tokens go through the LM head (TRL's ``logits_to_keep``):
    with a large vocabulary and a long prompt, projecting the prompt's positions would be most of
    the work. Greedy sampling (temperature 0) records log-probs at temperature 1, as the sampler does.
    """
    temperature = temperature if temperature > 0 else 1.0
    hidden, _ = model.hidden_states(input_ids, attention_mask)
    out = head_stats(hidden[:, prompt_len - 1 : -1], model.logits, input_ids[:, prompt_len:],
                     temperature=temperature, entropy=True, chunk_len=chunk_len)
    return out.logps, out.entropy
