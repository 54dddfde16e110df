"""Supervised fine-tuning with ms-swift's documented defaults for full-parameter training.

Use: ``jaxalign sft --config configs/sft.py --model M --dataset D --output_dir O``; any flag
overrides the value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # data
            max_length=2048,
            truncation_strategy="delete",
            loss_scale="default",
            split_dataset_ratio=0.0,
            # optimisation (ms-swift: 1e-5 for full fine-tuning, 1e-4 for LoRA)
            learning_rate=1e-5,
            lr_scheduler_type="cosine",
            warmup_ratio=0.0,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            num_train_epochs=3.0,
            per_device_train_batch_size=1,
            per_device_eval_batch_size=1,
            gradient_checkpointing=True,
            seed=42,
            data_seed=42,
            # logging and checkpoints
            logging_steps=5,
            save_steps=500,
            save_total_limit=None,
            report_to="none",
            save_hf=True,
        )
    )
