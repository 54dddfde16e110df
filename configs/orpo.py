"""`jaxalign rlhf --config configs/orpo.py`: ORPO (Hong et al. 2024): chosen NLL + beta (lambda) x odds-ratio loss, no reference model.

ms-swift's defaults for full fine-tuning; command-line flags override any value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "orpo",
            "beta": 0.1,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
