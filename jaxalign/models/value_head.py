"""A scalar value head on the decoder: reward models (``rlhf_type rm``) and PPO values.

Parameters map to TRL's ``AutoModelForCausalLMWithValueHead`` layout:
``v_head.summary.kernel`` [hidden, 1] <-> ``v_head.summary.weight`` [1, hidden] (transposed),
``v_head.summary.bias`` [1] <-> ``v_head.summary.bias`` [1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models.decoder import Decoder


class ValueHead(nnx.Module):
    """hidden -> 1 linear layer with bias, computed in float32."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.summary = _Summary(hidden, rngs=rngs, std=std)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] -> [...]."""
        return self.summary(hidden)[..., 0]


class _Summary(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs, std: float):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (hidden, 1), jnp.float32), axes=("embed", None))
        self.bias = nnx.Param(jnp.zeros((1,), jnp.float32), axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return jnp.dot(x, self.kernel[...], preferred_element_type=jnp.float32) + self.bias[...]


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real token (right or left padding); 0 for an empty row."""
    mask = attention_mask.astype(jnp.int32)
    t = mask.shape[1]
    pos = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(mask > 0, pos, 0), axis=1)


class RewardModel(nnx.Module):
    """A decoder backbone plus a :class:`ValueHead`: ``scores`` [B] and per-token ``values`` [B, T]."""

    def __init__(self, backbone: Decoder, v_head: ValueHead):
        self.backbone = backbone
        self.v_head = v_head

    @property
    def config(self):
        return self.backbone.config

    def values(self, input_ids, attention_mask=None) -> jax.Array:
        """The head applied to every position's final hidden state: [B, T] float32."""
        hidden, _ = self.backbone.hidden_states(input_ids, attention_mask)
        return self.v_head(hidden)

    def scores(self, input_ids, attention_mask=None) -> jax.Array:
        """The value at each row's last non-pad token: [B] float32."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        values = self.values(input_ids, attention_mask)
        idx = last_token_index(attention_mask)
        return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        return self.scores(input_ids, attention_mask)


def new_reward_model(backbone: Decoder, seed: int = 0, std: float | None = None) -> RewardModel:
    """``backbone`` plus a freshly initialised head (normal(0, std), std defaulting to 0.02)."""
    head = ValueHead(backbone.config.hidden_size, rngs=nnx.Rngs(seed), std=0.02 if std is None else std)
    return RewardModel(backbone, head)
