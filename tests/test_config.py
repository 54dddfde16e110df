"""The option schema: ms-swift names and defaults, layering defaults <- config file <- flags,
validation with the valid choices, the shipped configs, and the devices a --mesh spec takes."""

from __future__ import annotations

import jax
import pytest

from jaxalign.config import OPTIONS, default_config, load_config_file, resolve
from jaxalign.errors import ConfigError, ShardingError
from helpers import CONFIGS

# ms-swift's documented defaults for full-parameter `swift sft` (and the trainer arguments it inherits).
SWIFT_DEFAULTS = dict(
    learning_rate=1e-5, lr_scheduler_type="cosine", warmup_ratio=0.0, weight_decay=0.1, adam_beta1=0.9,
    adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, num_train_epochs=3.0, max_steps=-1,
    per_device_train_batch_size=1, per_device_eval_batch_size=1, gradient_checkpointing=True, seed=42,
    data_seed=42, logging_steps=5, save_steps=500, eval_steps=None, save_total_limit=None,
    resume_from_checkpoint=None, output_dir="output", split_dataset_ratio=0.0, gradient_accumulation_steps=None,
)


def test_defaults_are_swift_defaults():
    cfg = resolve("sft", None, {})
    for key, value in SWIFT_DEFAULTS.items():
        assert cfg[key] == value, key
    assert "rlhf_type" not in cfg  # rlhf-only options stay off `sft`
    assert default_config("rlhf").rlhf_type == "dpo"


def test_batch_size_defaults_per_algorithm_run():
    """ms-swift's 1 row per device, except where 1 cannot run: KTO's KL pairs need 2 rows, a GRPO
    device holds whole groups of num_generations completions. An explicit value always wins."""
    def batch(**flags):
        return resolve("rlhf", None, flags).per_device_train_batch_size

    assert batch(rlhf_type="dpo") == 1 and batch(rlhf_type="rm") == 1 and batch(rlhf_type="ppo") == 1
    assert batch(rlhf_type="kto") == 2
    assert batch(rlhf_type="grpo") == 8 and batch(rlhf_type="grpo", num_generations="4") == 4
    assert batch(rlhf_type="kto", per_device_train_batch_size="1") == 1
    assert batch(rlhf_type="grpo", per_device_train_batch_size="3") == 3


def test_flags_override_file_override_defaults(tmp_path):
    f = tmp_path / "c.py"
    f.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(learning_rate=2e-4, max_steps=100, lr_scheduler_type='linear'))\n"
    )
    cfg = resolve("sft", load_config_file(f), {"max_steps": "7", "gradient_checkpointing": "false"})
    assert cfg.learning_rate == 2e-4 and cfg.lr_scheduler_type == "linear"  # file
    assert cfg.max_steps == 7 and cfg.gradient_checkpointing is False  # flags, coerced from strings
    assert cfg.weight_decay == 0.1  # default


def test_sft_config_restates_swift_defaults():
    file_cfg = load_config_file(CONFIGS / "sft.py")
    cfg = resolve("sft", file_cfg, {})
    defaults = resolve("sft", None, {})
    for key in file_cfg:
        if key == "truncation_strategy":  # spelled out: the schema's None means delete for SFT
            assert cfg[key] == "delete"
            continue
        assert cfg[key] == defaults[key], key
    cfg = resolve("sft", file_cfg, {"learning_rate": "1e-4", "num_train_epochs": "1"})
    assert cfg.learning_rate == 1e-4 and cfg.num_train_epochs == 1.0 and cfg.adam_beta2 == 0.95


def test_tiny_cpu_config():
    cfg = resolve("sft", load_config_file(CONFIGS / "tiny_cpu.py"), {"max_steps": "3"})
    assert cfg.mesh == "data=1,fsdp=1,tensor=1" and cfg.gradient_checkpointing is False
    assert cfg.max_length == 64 and cfg.length_buckets == "32,64" and cfg.max_steps == 3
    assert cfg.torch_dtype == "float32"


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"lr_scheduler_type": "foo"}, "--lr_scheduler_type 'foo': not one of cosine, linear, constant"),
        ({"report_to": "wandb"}, "--report_to 'wandb': not one of none, tensorboard"),
        ({"learning_rate": "fast"}, "--learning_rate 'fast': expected float"),
        ({"save_hf": "perhaps"}, "--save_hf 'perhaps': expected true or false"),
        ({"max_length": "0"}, "--max_length 0: must be positive"),
        ({"gradient_accumulation_steps": "-2"}, "--gradient_accumulation_steps -2: must be positive"),
        ({"split_dataset_ratio": "1.0"}, "--split_dataset_ratio 1.0: must be in [0, 1)"),
        ({"beta": "0.1"}, "command line: unknown option 'beta'; see `jaxalign sft --help`"),
    ],
)
def test_invalid_values_refused(flags, message):
    with pytest.raises(ConfigError) as e:
        resolve("sft", None, flags)
    assert str(e.value) == message


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("Yes", True), ("false", False),
                                            ("0", False), ("off", False)])
def test_booleans(value, expected):
    assert resolve("sft", None, {"save_hf": value}).save_hf is expected


def test_none_resets_optional_options():
    assert resolve("sft", None, {"eval_steps": "none", "save_total_limit": "None"}).eval_steps is None


def test_loss_scale_defaults_per_algorithm_as_ms_swift():
    assert resolve("sft", None, {}).loss_scale == "default"  # ms-swift sft: every reply
    assert [resolve("rlhf", None, {"rlhf_type": t}).loss_scale for t in ("dpo", "orpo", "kto")] == [
        "last_round", "default", "last_round"]
    assert resolve("rlhf", None, {"rlhf_type": "orpo", "loss_scale": "last_round"}).loss_scale == "last_round"


def test_truncation_defaults_per_algorithm_as_ms_swift():
    # None: the encoder's default for the data kind (delete; left for GRPO's prompts); PPO's prompts are deleted
    assert [resolve("rlhf", None, {"rlhf_type": t}).truncation_strategy for t in ("dpo", "grpo", "ppo")] == [
        None, None, "delete"]
    assert resolve("rlhf", None, {"rlhf_type": "ppo", "truncation_strategy": "left"}).truncation_strategy == "left"


def test_every_option_has_help_and_valid_default():
    for name, opt in OPTIONS.items():
        assert opt.help, name
        if opt.choices is not None:
            assert opt.default in opt.choices, name


def test_mesh_spec_picks_devices():
    from jaxalign.parallel import run_mesh

    assert len(jax.devices()) == 8
    assert run_mesh("data=1,fsdp=1,tensor=1").devices.size == 1
    m = run_mesh("data=1,fsdp=2,tensor=1")
    assert m.devices.size == 2 and dict(m.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
    assert run_mesh("data=1,fsdp=-1,tensor=1").devices.size == 8
    assert dict(run_mesh("data=2,fsdp=-1,tensor=2").shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ShardingError, match="needs 16 devices but 8 are available"):
        run_mesh("data=1,fsdp=16,tensor=1")
