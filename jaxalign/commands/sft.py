"""`jaxalign sft`: supervised fine-tuning on ms-swift-format conversations."""

from jaxalign.commands.training import register_training

NAME = "sft"


def register(sub) -> None:
    register_training(sub, NAME, "supervised fine-tuning (ms-swift's `swift sft`)")
