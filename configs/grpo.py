"""`jaxalign rlhf --config configs/grpo.py`: GRPO (Shao et al. 2024) with the DAPO, Dr. GRPO and GSPO switches.

ms-swift's defaults for full fine-tuning; command-line flags override any value here. Batch sizes
count completions: per_device_train_batch_size x data-parallel devices x steps_per_generation
must be divisible by num_generations.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "rlhf_type": "grpo",
            "reward_funcs": "accuracy format",
            "num_generations": 8,
            "max_completion_length": 512,
            "temperature": 0.9,
            "beta": 0.04,
            "epsilon": 0.2,
            "epsilon_high": None,  # DAPO: 0.28
            "loss_type": "grpo",  # grpo | bnpo | dr_grpo | dapo
            "importance_sampling_level": "token",  # sequence: GSPO
            "scale_rewards": "group",  # Dr. GRPO: none
            "num_iterations": 1,
            "dynamic_sample": False,
            "overlong_filter": False,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "cosine",
        },
        type_safe=False,
    )
