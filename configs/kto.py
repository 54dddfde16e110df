"""`jaxalign rlhf --config configs/kto.py`: KTO (Ethayarajh et al. 2024); rows carry a boolean `label`.

ms-swift's defaults for full fine-tuning; command-line flags override any value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "kto",
            "beta": 0.1,
            "desirable_weight": 1.0,
            "undesirable_weight": 1.0,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
