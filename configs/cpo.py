"""`jaxalign rlhf --config configs/cpo.py`: CPO (Xu et al. 2024): preference loss plus cpo_alpha x chosen NLL, no reference model.

ms-swift's defaults for full fine-tuning; command-line flags override any value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "cpo",
            "beta": 0.1,
            "loss_type": 'sigmoid',
            "label_smoothing": 0.0,
            "cpo_alpha": 1.0,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
