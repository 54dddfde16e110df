"""The algorithm registry is the one place an rlhf type is declared: the CLI's choices and help, the
data kinds, the default beta and batch size, and the reference-model rule all follow from it."""

from __future__ import annotations

import importlib

import pytest

from jaxalign.algorithms import ALGORITHMS, RLHF_TYPES, make_algorithm, spec_of
from jaxalign.cli import build_parser
from jaxalign.config import OPTIONS, resolve
from jaxalign.data.formats import KIND_OF
from jaxalign.errors import ConfigError
from jaxalign.trainers.trainer import Algorithm


def test_cli_choices_and_help_come_from_the_registry():
    assert OPTIONS["rlhf_type"].choices == RLHF_TYPES
    assert set(RLHF_TYPES) == {"dpo", "cpo", "simpo", "orpo", "kto", "rm", "grpo", "ppo"}
    help_text = build_parser().subcommands["rlhf"].description
    for name in RLHF_TYPES:
        assert name in help_text


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_entry_builds_its_algorithm(name):
    spec = ALGORITHMS[name]
    flags = {} if spec.command == "sft" else {"rlhf_type": name}
    cfg = resolve(spec.command, None, flags)
    algo = make_algorithm(cfg)
    module, cls = spec.entry.split(":")
    assert type(algo) is getattr(importlib.import_module(module), cls)
    assert algo.name == name and algo.spec is spec
    assert KIND_OF[name] == spec.data_kind
    # the protocol, checked member by member (no hasattr dispatch in the Trainer)
    for member in ("curve_keys", "progress_keys", "prepare_model", "rows_per_batch", "total_steps", "setup",
                   "run_step", "loss_fn", "totals_fn", "extra", "state_dict", "load_state_dict", "export", "policy"):
        assert hasattr(algo, member), member
    if spec.default_beta is not None:
        assert cfg.beta == spec.default_beta


def test_defaults_follow_the_registry():
    assert resolve("rlhf", None, {"rlhf_type": "simpo"}).beta == 2.0
    assert resolve("rlhf", None, {"rlhf_type": "grpo"}).beta == 0.04
    assert resolve("rlhf", None, {"rlhf_type": "grpo", "beta": "0"}).beta == 0.0  # an explicit 0 stays
    assert spec_of("kto").batch_size == 2 and resolve("rlhf", None, {"rlhf_type": "kto"}).per_device_train_batch_size == 2


@pytest.mark.parametrize("name", [n for n in RLHF_TYPES if ALGORITHMS[n].reference == "none"])
def test_ref_model_refused_where_there_is_no_reference(name):
    with pytest.raises(ConfigError, match="uses no reference model"):
        resolve("rlhf", None, {"rlhf_type": name, "ref_model": "x"})


@pytest.mark.parametrize("flags, words", [
    ({"rlhf_type": "dpo", "loss_type": "nope"}, "not valid for dpo"),
    ({"rlhf_type": "dpo", "loss_type": "sigmoid,ipo", "loss_weights": "1"}, "2 loss types"),
    ({"rlhf_type": "cpo", "loss_type": "sigmoid,hinge"}, "only dpo mixes"),
    ({"rlhf_type": "grpo", "loss_type": "sigmoid"}, "not valid for grpo"),
    ({"rlhf_type": "grpo", "num_generations": "1"}, "at least 2 completions"),
    ({"rlhf_type": "kto", "beta": "0"}, "KTO needs beta > 0"),
    ({"rlhf_type": "simpo", "loss_type": "hinge"}, "simpo has its own loss"),
])
def test_options_are_checked_when_resolved(flags, words):
    """Refused before any model or data is read, as TRL's configs do in __post_init__."""
    with pytest.raises(ConfigError, match=words):
        resolve("rlhf", None, flags)


def test_dpo_aliases_resolve():
    from jaxalign.losses.preference import preference_loss_types

    assert preference_loss_types("dpo", "aot_unpaired,sft", "0.5,1") == (("aot_pair", "sft"), (0.5, 1.0))
    assert resolve("rlhf", None, {"rlhf_type": "dpo", "loss_type": "aot_unpaired"}).loss_type == "aot_unpaired"


def test_algorithm_is_a_protocol():
    assert getattr(Algorithm, "_is_protocol", False)
