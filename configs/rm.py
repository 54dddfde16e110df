"""`jaxalign rlhf --config configs/rm.py`: Reward model: backbone + value head, Bradley-Terry loss (optional `margin` column).

ms-swift's defaults for full fine-tuning; command-line flags override any value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "rm",
            "center_rewards_coefficient": None,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
