"""`jaxalign rlhf --config configs/dpo.py`: DPO (Rafailov et al. 2023) with ms-swift's RPO term.

ms-swift's defaults for full fine-tuning; command-line flags override any value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "dpo",
            "beta": 0.1,
            "loss_type": 'sigmoid',
            "label_smoothing": 0.0,
            "rpo_alpha": 1.0,
            "precompute_ref_log_probs": False,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
