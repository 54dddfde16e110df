"""A trained reward model (``jaxalign rlhf --rlhf_type rm`` export) used as a GRPO reward function."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxalign.convert.reward_model import load_reward_model
from jaxalign.errors import ConfigError
from jaxalign.parallel.activations import mesh_context


class RewardModelReward:
    """Scores prompt + completion token ids with a RewardModel; one compilation per padded length. It runs sharded
    over the mesh, so on several hosts every host calls it with every row (``collective``)."""

    collective = True

    def __init__(self, model, name: str = "reward_model", mesh=None):
        self.name = name
        self.mesh = mesh  # the model's activations are sharded over its mesh's batch axes
        graphdef, state = nnx.split(model)
        self._state = state
        self._fn = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st).scores(ids, mask))
        self.pad_id = model.config.pad_token_id or 0

    @classmethod
    def from_path(cls, path: str | Path, tokenizer, *, mesh=None, vocab_size: int | None = None):
        model = load_reward_model(path, mesh=mesh, what="--reward_model ")
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            raise ConfigError(
                f"--reward_model {path}: vocabulary of {model.config.vocab_size} tokens differs from the policy's "
                f"{vocab_size}; the reward model must share the policy's tokenizer"
            )
        return (Path(path).name or "reward_model", cls(model, name=Path(path).name or "reward_model", mesh=mesh))

    def __call__(self, completions, *, prompt_ids=None, completion_ids=None, **_) -> list[float]:
        if prompt_ids is None or completion_ids is None:
            raise ConfigError("the reward-model reward needs the prompt_ids and completion_ids columns")
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        length = max(len(s) for s in seqs)
        length = 1 << (length - 1).bit_length()  # power-of-two buckets bound the compilations
        ids = np.full((len(seqs), length), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), length), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        with mesh_context(self.mesh):
            scores = self._fn(self._state, ids, mask)
        return [float(x) for x in np.asarray(scores)]
