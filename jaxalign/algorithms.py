"""The one table of training algorithms: what each reads, its defaults and its model rules.

The CLI's ``--rlhf_type`` choices and help, the dataset kinds, the default ``--beta`` and
``--per_device_train_batch_size``, and which models an algorithm accepts all come from here.
Adding an algorithm means one entry below plus its own module under ``jaxalign/trainers/``.
"""

from __future__ import annotations

import dataclasses
import importlib

from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one algorithm is run.

    ``data_kind``: the row format it reads (``sft``, ``pair``, ``kto`` or ``prompt``).
    ``reference``: ``"none"`` (``--ref_model`` refused), ``"policy"`` (the starting model unless
    ``--ref_model``), or ``"beta"`` (the starting model while ``--beta`` > 0).
    ``batch_size``: rows per device when ``--per_device_train_batch_size`` is not given; an int or the
    name of the option it follows. ``entry``: ``module:Class`` of the algorithm object.
    """

    name: str
    data_kind: str
    entry: str
    summary: str
    default_beta: float | None = None
    reference: str = "none"
    reward_model: bool = False
    batch_size: int | str = 1
    command: str = "rlhf"


ALGORITHMS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec("sft", "sft", "jaxalign.trainers.sft:SFT", "supervised fine-tuning", command="sft"),
        Spec("dpo", "pair", "jaxalign.trainers.preference:PairPreference", "direct preference optimisation",
             default_beta=0.1, reference="policy"),
        Spec("cpo", "pair", "jaxalign.trainers.preference:PairPreference", "contrastive preference optimisation",
             default_beta=0.1),
        Spec("simpo", "pair", "jaxalign.trainers.preference:PairPreference", "simple preference optimisation",
             default_beta=2.0),
        Spec("orpo", "pair", "jaxalign.trainers.preference:PairPreference", "odds-ratio preference optimisation",
             default_beta=0.1),
        # KTO pairs each prompt with another row's completion for its KL point: 2 rows per micro-batch.
        Spec("kto", "kto", "jaxalign.trainers.kto:KTO", "Kahneman-Tversky optimisation", default_beta=0.1,
             reference="policy", batch_size=2),
        Spec("rm", "pair", "jaxalign.trainers.reward:RewardModelling", "reward model (value head)"),
        # A GRPO device holds whole groups, so the generation batch always divides into them.
        Spec("grpo", "prompt", "jaxalign.trainers.grpo:GRPO", "group relative policy optimisation",
             default_beta=0.04, reference="beta", batch_size="num_generations"),
        Spec("ppo", "prompt", "jaxalign.trainers.ppo:PPO", "proximal policy optimisation", default_beta=0.1,
             reference="policy", reward_model=True),
    )
}
RLHF_TYPES: tuple[str, ...] = tuple(name for name, s in ALGORITHMS.items() if s.command == "rlhf")


def spec_of(name: str) -> Spec:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"--rlhf_type {name}: unknown; choose one of {', '.join(RLHF_TYPES)}") from None


def rlhf_help() -> str:
    return "preference alignment: --rlhf_type " + "|".join(RLHF_TYPES)


def default_batch_size(spec: Spec, cfg) -> int:
    return spec.batch_size if isinstance(spec.batch_size, int) else int(cfg[spec.batch_size])


def make_algorithm(cfg):
    """The algorithm object for ``cfg`` (``rlhf_type``, or SFT for a config without one)."""
    spec = spec_of(cfg.get("rlhf_type") or "sft")
    module, cls = spec.entry.split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
