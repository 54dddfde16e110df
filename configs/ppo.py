"""`jaxalign rlhf --config configs/ppo.py`: PPO (TRL's PPOv2): policy, reference, reward and value models.

ms-swift's defaults for full fine-tuning; command-line flags override any value here. Give the
reward model with --reward_model (an `rm` export); the value model starts from it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "ppo",
            "max_completion_length": 512,
            "temperature": 0.9,
            "num_ppo_epochs": 4,
            "num_mini_batches": 1,
            "kl_coef": 0.05,
            "cliprange": 0.2,
            "cliprange_value": 0.2,
            "vf_coef": 0.1,
            "gamma": 1.0,
            "lam": 0.95,
            "whiten_rewards": False,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
