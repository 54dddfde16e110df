"""Tiny CPU settings: short sequences, one device, no rematerialisation, frequent logs.

Use with a tiny model, e.g. ``jaxalign sft --config configs/tiny_cpu.py --model M --dataset D
--output_dir O``; any flag overrides the value here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            max_length=64,
            length_buckets="32,64",
            truncation_strategy="delete",
            mesh="data=1,fsdp=1,tensor=1",
            torch_dtype="float32",
            gradient_checkpointing=False,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            gradient_accumulation_steps=1,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_ratio=0.0,
            weight_decay=0.0,
            max_steps=20,
            logging_steps=1,
            save_steps=10,
            save_total_limit=2,
        )
    )
