"""Pure loss functions of arrays for every alignment algorithm (no model, no optimizer)."""

from jaxalign.losses.grpo import gdpo_advantages, group_advantages, grpo_loss
from jaxalign.losses.ppo import (
    compute_gae,
    kl_penalty_rewards,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from jaxalign.losses.preference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from jaxalign.losses.reward import reward_loss

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "compute_gae",
    "cpo_loss",
    "dpo_loss",
    "group_advantages",
    "gdpo_advantages",
    "grpo_loss",
    "kl_penalty_rewards",
    "kto_kl",
    "kto_loss",
    "masked_mean",
    "masked_var",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_loss",
    "simpo_loss",
    "whiten",
]
