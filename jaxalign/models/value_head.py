"""A scalar value head on the decoder: reward models (``rlhf_type rm``) and PPO values.

Two heads, as the ecosystem ships reward models (``RewardModel.head``):

* ``value_head``: TRL's ``AutoModelForCausalLMWithValueHead``, ``v_head.summary.kernel`` [hidden, 1] <->
  ``v_head.summary.weight`` [1, hidden] (transposed), ``v_head.summary.bias`` [1]; the score is read at each
  row's last attended token.
* ``seq_cls``: a ``*ForSequenceClassification`` model's ``score.weight`` [1, hidden], no bias; the score is
  read as ``transformers`` reads it: at the rightmost token whose id is not ``pad_token_id`` (jaxalign also
  skips positions outside the attention mask, where transformers assumes padding uses ``pad_token_id``).
  The bias parameter is kept (so checkpoints, LoRA and shardings have one layout) but is never applied, so it
  gets no gradient and stays 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.decoder import Decoder


class ValueHead(nnx.Module):
    """hidden -> 1 linear layer with bias, computed in float32."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, std: float = 0.02, use_bias: bool = True):
        self.summary = _Summary(hidden, rngs=rngs, std=std, use_bias=use_bias)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] -> [...]."""
        return self.summary(hidden)[..., 0]


class _Summary(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs, std: float, use_bias: bool = True):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (hidden, 1), jnp.float32), axes=("embed", None))
        self.bias = nnx.Param(jnp.zeros((1,), jnp.float32), axes=(None,))
        self.use_bias = use_bias  # False: a sequence-classification ``score`` head (the bias stays 0, unused)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        out = jnp.dot(x, self.kernel[...], preferred_element_type=jnp.float32)
        return out + self.bias[...] if self.use_bias else out


def last_token_index(attention_mask: jax.Array, input_ids: jax.Array | None = None,
                     pad_token_id: int | None = None) -> jax.Array:
    """Index of each row's last real token (right or left padding); 0 for an empty row. With
    ``pad_token_id``, tokens with that id do not count either (``transformers``' sequence-classification rule)."""
    real = attention_mask > 0
    if pad_token_id is not None and input_ids is not None:
        real = real & (input_ids != pad_token_id)
    t = real.shape[1]
    pos = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(real, pos, 0), axis=1)


HEADS = ("value_head", "seq_cls")


class RewardModel(nnx.Module):
    """A decoder backbone plus a :class:`ValueHead`: ``scores`` [B] and per-token ``values`` [B, T]."""

    def __init__(self, backbone: Decoder, v_head: ValueHead, *, head: str = "value_head",
                 pad_token_id: int | None = None):
        if head not in HEADS:
            raise ValueError(f"head {head!r}: expected one of {HEADS}")
        self.backbone = backbone
        self.v_head = v_head
        self.head = head  # value_head (TRL) or seq_cls (transformers' *ForSequenceClassification)
        # seq_cls: the id transformers skips when it picks the scored token (config.json's pad_token_id)
        self.pad_token_id = pad_token_id if head == "seq_cls" else None
        v_head.summary.use_bias = head == "value_head"

    @property
    def config(self):
        return self.backbone.config

    def values(self, input_ids, attention_mask=None) -> jax.Array:
        """The head applied to every position's final hidden state: [B, T] float32."""
        hidden, _ = self.backbone.hidden_states(input_ids, attention_mask)
        return self.v_head(hidden)

    def scores(self, input_ids, attention_mask=None) -> jax.Array:
        """The value at each row's last non-pad token: [B] float32 (seq_cls: the token ``transformers`` picks)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        values = self.values(input_ids, attention_mask)
        idx = last_token_index(attention_mask, input_ids, self.pad_token_id)
        return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        return self.scores(input_ids, attention_mask)


def new_reward_model(backbone: Decoder, seed: int = 0, std: float | None = None, *, head: str = "value_head",
                     pad_token_id: int | None = None) -> RewardModel:
    """``backbone`` plus a freshly initialised head (normal(0, std), std defaulting to 0.02); ``head`` seq_cls
    makes it bias-free and scored as a ``*ForSequenceClassification`` model (``pad_token_id`` defaulting to the
    backbone's)."""
    v_head = ValueHead(backbone.config.hidden_size, rngs=nnx.Rngs(seed), std=0.02 if std is None else std)
    if pad_token_id is None:
        pad_token_id = backbone.config.pad_token_id
    return RewardModel(backbone, v_head, head=head, pad_token_id=pad_token_id)
