"""`jaxalign rlhf --rlhf_type ...`: every algorithm of the registry but SFT (ms-swift's `swift rlhf`)."""

from jaxalign.algorithms import rlhf_help
from jaxalign.commands.training import register_training

NAME = "rlhf"


def register(sub) -> None:
    register_training(sub, NAME, rlhf_help())
