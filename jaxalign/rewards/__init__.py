"""Reward functions for GRPO, as ms-swift defines them (swift/rewards/orm.py).

Each reward is a callable ``f(completions: list[str], **columns) -> list[float]``; ``columns`` are the
dataset's extra columns aligned with ``completions`` (``solution``, and from the trainer
``completion_ids``). Built in: ``accuracy``, ``format``, ``cosine``, ``repetition``,
``soft_overlong``; more come from ``--external_plugins`` files (see :mod:`jaxalign.rewards.registry`).
"""

from jaxalign.rewards.cosine import CosineReward, cosine_value
from jaxalign.rewards.format_reward import FORMAT_PATTERN, format_reward
from jaxalign.rewards.lengths import completion_lengths
from jaxalign.rewards.math_accuracy import accuracy
from jaxalign.rewards.registry import (
    BUILTIN_REWARDS,
    available_reward_funcs,
    build_reward_funcs,
    load_plugins,
    register,
    split_names,
    unregister,
)
from jaxalign.rewards.repetition import RepetitionPenalty
from jaxalign.rewards.scoring import reward_metrics, score_completions
from jaxalign.rewards.soft_overlong import SoftOverlong

__all__ = [
    "split_names",
    "BUILTIN_REWARDS",
    "FORMAT_PATTERN",
    "CosineReward",
    "RepetitionPenalty",
    "SoftOverlong",
    "accuracy",
    "available_reward_funcs",
    "build_reward_funcs",
    "completion_lengths",
    "cosine_value",
    "format_reward",
    "load_plugins",
    "register",
    "reward_metrics",
    "score_completions",
    "unregister",
]
