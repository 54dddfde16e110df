"""`jaxalign rlhf --config configs/simpo.py`: SimPO (Meng et al. 2024) on length-averaged log-probs; ms-swift's default keeps cpo_alpha 1.0 (0.0 gives the original SimPO).

ms-swift's defaults for full fine-tuning; command-line flags override any value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "simpo",
            "beta": 2.0,
            "simpo_gamma": 1.0,
            "cpo_alpha": 1.0,
            "label_smoothing": 0.0,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
