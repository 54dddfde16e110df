"""The option schema: ms-swift's flag names and defaults, validation, and config files.

Options come from three layers, later ones winning: the defaults below, a ``--config
configs/NAME.py`` file whose ``get_config()`` returns an ``ml_collections.ConfigDict``, and
command-line flags. The result is one ``ConfigDict`` handed to the trainers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import ml_collections

from jaxalign.algorithms import ALGORITHMS, RLHF_TYPES, default_batch_size, spec_of
from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Option:
    default: Any
    type: type
    help: str
    choices: tuple | None = None
    commands: tuple[str, ...] = ("sft", "rlhf")
    # A list, as in ms-swift: space-separated on the command line (``--reward_funcs accuracy format``), a list or a
    # comma-separated string in a config file; held as one comma-separated string.
    multi: bool = False


_T = ("sft", "rlhf")
_RLHF = ("rlhf",)

OPTIONS: dict[str, Option] = {
    # Model and data
    "model": Option(None, str, "Hugging Face model folder (or jaxalign checkpoint) to start from"),
    "dataset": Option(None, str, "dataset file(s), space- or comma-separated; FILE#N samples N rows", multi=True),
    "val_dataset": Option(None, str, "explicit evaluation dataset file(s)", multi=True),
    "split_dataset_ratio": Option(0.0, float, "fraction of the dataset held out for evaluation"),
    "output_dir": Option("output", str, "where checkpoints, logs and the final model go"),
    "max_length": Option(2048, int, "longest tokenised sequence (prompt + response)"),
    "truncation_strategy": Option(
        None, str, "what to do with longer rows (default: delete; left for GRPO's prompts, as ms-swift)",
        (None, "delete", "left", "right"),
    ),
    "template": Option(None, str, "chat template: the tokenizer's own (default; Gemma's when a Gemma model's "
                       "tokenizer has none), 'plain' or 'gemma'", (None, "plain", "gemma")),
    "loss_scale": Option(
        None, str, "trained tokens: every reply (default; as ms-swift, SFT's and ORPO's default), the last reply "
        "(last_round; the other algorithms' default) or every token (all)", (None, "last_round", "default", "all"),
    ),
    "ignore_bad_rows": Option(False, bool, "skip malformed rows (counted) instead of stopping"),
    "columns": Option(None, str, 'rename dataset columns: a JSON object {"source": "name read"}, as ms-swift\'s'),
    "length_buckets": Option(None, str, "padded lengths; default powers of two from 64 up to max_length",
                             multi=True),
    # Tuner (LoRA as PEFT and ms-swift name it)
    "tuner_type": Option("full", str, "train all parameters, or LoRA adapters (alias --train_type)", ("full", "lora")),
    "lora_rank": Option(8, int, "LoRA rank r"),
    "lora_alpha": Option(32.0, float, "LoRA alpha (scaling alpha / r)"),
    "lora_dropout": Option(0.05, float, "dropout on the adapters' input while training"),
    "target_modules": Option("all-linear", str, "adapted layers: all-linear or names (q_proj k_proj v_proj o_proj "
                             "gate_proj up_proj down_proj)", multi=True),
    "use_rslora": Option(False, bool, "rank-stabilised scaling alpha / sqrt(r)"),
    "init_lora_weights": Option(True, bool, "B = 0 so step 0 equals the base (false: B random too)"),
    "adapters": Option(None, str, "start from this LoRA adapter folder (PEFT format) instead of fresh adapters"),
    "ref_adapters": Option(None, str, "reference = the base with this adapter (default: adapters off)", None, ("rlhf",)),
    # Optimisation
    "per_device_train_batch_size": Option(
        None, int, "rows per device per micro-batch (default 1; kto 2, so its KL pairs exist; grpo num_generations)"
    ),
    "per_device_eval_batch_size": Option(1, int, "rows per device per evaluation batch"),
    "gradient_accumulation_steps": Option(
        None, int, "micro-batches per step (default: so the total batch is >= 16; grpo and ppo 1)"
    ),
    "learning_rate": Option(None, float, "peak learning rate (default, as ms-swift: 1e-5 full, 1e-4 lora)"),
    "lr_scheduler_type": Option("cosine", str, "learning-rate schedule", ("cosine", "linear", "constant")),
    "warmup_ratio": Option(0.0, float, "fraction of steps with linear warm-up"),
    "weight_decay": Option(0.1, float, "AdamW weight decay (matrices only)"),
    "adam_beta1": Option(0.9, float, "AdamW beta1"),
    "adam_beta2": Option(0.95, float, "AdamW beta2"),
    "adam_epsilon": Option(1e-8, float, "AdamW epsilon"),
    "max_grad_norm": Option(1.0, float, "global gradient-norm clip (0 disables)"),
    "num_train_epochs": Option(3.0, float, "passes over the training set"),
    "max_steps": Option(-1, int, "stop after this many steps (overrides num_train_epochs when > 0)"),
    "seed": Option(42, int, "seed for initialisation, dropout-free sampling and the trainer"),
    "data_seed": Option(42, int, "seed for dataset shuffling and sampling"),
    "gradient_checkpointing": Option(True, bool, "rematerialise each layer in the backward pass"),
    "remat_policy": Option("full", str, "what gradient checkpointing keeps of a layer: full (only its input), "
                           "save_dots (also its weight matmuls' outputs), none (everything)",
                           ("full", "save_dots", "none")),
    "attn_impl": Option(
        "auto", str, "attention: auto (by platform and length), xla (full scores), chunked (memory-efficient XLA), "
        "cudnn (GPU flash, bfloat16), splash (TPU Pallas kernel)", ("auto", "xla", "chunked", "cudnn", "splash"),
    ),
    "torch_dtype": Option("float32", str, "compute dtype (params stay float32)", ("float32", "bfloat16")),
    "mesh": Option("data=1,fsdp=-1,tensor=1", str, "device mesh, e.g. data=2,fsdp=-1,tensor=1"),
    # Logging and checkpoints
    "logging_steps": Option(5, int, "log metrics every N steps"),
    "eval_steps": Option(None, int, "evaluate every N steps (default: save_steps)"),
    "save_steps": Option(500, int, "checkpoint every N steps"),
    "save_total_limit": Option(None, int, "keep at most N checkpoints (oldest removed)"),
    "resume_from_checkpoint": Option(None, str, "checkpoint folder, or 'latest' in output_dir"),
    "report_to": Option("none", str, "extra metric sink", ("none", "tensorboard")),
    "save_hf": Option(True, bool, "export the final model as a Hugging Face folder into output_dir"),
    # RLHF (jaxalign rlhf)
    "rlhf_type": Option("dpo", str, "algorithm", RLHF_TYPES, _RLHF),
    "beta": Option(None, float, "beta (default per algorithm: " + ", ".join(
        f"{n} {s.default_beta}" for n, s in ALGORITHMS.items() if s.default_beta is not None) + ")", None, _RLHF),
    "loss_type": Option(None, str, "loss type(s); DPO accepts several (default sigmoid)", None, _RLHF, multi=True),
    "loss_weights": Option(None, str, "weights of several DPO loss types", None, _RLHF, multi=True),
    "label_smoothing": Option(0.0, float, "conservative DPO/CPO label smoothing", None, _RLHF),
    "rpo_alpha": Option(1.0, float, "weight of the chosen NLL added to DPO (0 disables)", None, _RLHF),
    "reference_free": Option(False, bool, "DPO against a uniform reference (no reference model)", None, _RLHF),
    "ref_model": Option(None, str, "reference model folder (default: --model)", None, _RLHF),
    "precompute_ref_log_probs": Option(False, bool, "compute reference log-probs once before training", None, _RLHF),
    "discopop_tau": Option(0.05, float, "DiscoPOP temperature", None, _RLHF),
    "cpo_alpha": Option(1.0, float, "weight of the chosen NLL in CPO/SimPO (0 gives pure SimPO)", None, _RLHF),
    "simpo_gamma": Option(1.0, float, "SimPO target reward margin", None, _RLHF),
    "desirable_weight": Option(1.0, float, "KTO weight of desirable rows", None, _RLHF),
    "undesirable_weight": Option(1.0, float, "KTO weight of undesirable rows", None, _RLHF),
    "center_rewards_coefficient": Option(None, float, "RM penalty on squared rewards (0.01 recommended)", None, _RLHF),
    "rm_head": Option("value_head", str, "RM head and export: value_head (TRL's, with bias; backbone + "
                      "value_head.safetensors) or seq_cls (no bias; a *ForSequenceClassification folder)",
                      ("value_head", "seq_cls"), _RLHF),
    # Online RL: sampling (GRPO and PPO)
    "max_completion_length": Option(512, int, "longest sampled completion (tokens)", None, _RLHF),
    "temperature": Option(0.9, float, "sampling temperature", None, _RLHF),
    "top_k": Option(-1, int, "top-k sampling (-1 or 0: off)", None, _RLHF),
    "top_p": Option(1.0, float, "nucleus sampling", None, _RLHF),
    "repetition_penalty": Option(1.0, float, "Hugging Face repetition penalty", None, _RLHF),
    "reward_model": Option(None, str, "reward model folder: *ForSequenceClassification, or backbone + "
                           "value_head.safetensors", None, _RLHF),
    # GRPO
    "num_generations": Option(8, int, "completions per prompt (the group size)", None, _RLHF),
    "epsilon": Option(0.2, float, "lower clip range of the ratio", None, _RLHF),
    "epsilon_high": Option(None, float, "upper clip range (default: epsilon; DAPO uses 0.28)", None, _RLHF),
    "delta": Option(None, float, "upper bound on the ratio (two-sided GRPO)", None, _RLHF),
    "tau_pos": Option(1.0, float, "SAPO: gate temperature of tokens with a positive advantage", None, _RLHF),
    "tau_neg": Option(1.05, float, "SAPO: gate temperature of the other tokens", None, _RLHF),
    "importance_sampling_level": Option(
        "token", str, "token (GRPO) or sequence (GSPO) ratios", ("token", "sequence", "sequence_token"), _RLHF
    ),
    "scale_rewards": Option("group", str, "advantage scaling (gdpo: each reward function normalised in its group, "
                            "the weighted sum over the batch)", ("group", "batch", "none", "gdpo"), _RLHF),
    "num_iterations": Option(1, int, "optimisation passes over each generation (mu)", None, _RLHF),
    "steps_per_generation": Option(None, int, "micro-batches per generation (default: gradient_accumulation_steps)", None, _RLHF),
    "dynamic_sample": Option(False, bool, "DAPO: resample groups whose rewards all agree", None, _RLHF),
    "max_resample_times": Option(3, int, "DAPO resampling rounds", None, _RLHF),
    "overlong_filter": Option(False, bool, "exclude truncated completions from the loss", None, _RLHF),
    "shared_prefix": Option(True, bool, "GRPO and DPO: train each prompt once with its completions (chosen and "
                            "rejected) in one row, not once per completion", None, _RLHF),
    "reward_funcs": Option(None, str, "reward functions (accuracy format ...)", None, _RLHF, multi=True),
    "reward_weights": Option(None, str, "weights of the reward functions", None, _RLHF, multi=True),
    "external_plugins": Option(None, str, "Python file(s) registering reward functions", None, _RLHF,
                               multi=True),
    "cosine_min_len_value_wrong": Option(-0.5, float, "cosine reward: wrong answer, shortest", None, _RLHF),
    "cosine_max_len_value_wrong": Option(0.0, float, "cosine reward: wrong answer, longest", None, _RLHF),
    "cosine_min_len_value_correct": Option(1.0, float, "cosine reward: correct answer, shortest", None, _RLHF),
    "cosine_max_len_value_correct": Option(0.5, float, "cosine reward: correct answer, longest", None, _RLHF),
    "cosine_max_len": Option(None, int, "cosine reward length scale (default max_completion_length)", None, _RLHF),
    "repetition_n_grams": Option(3, int, "repetition reward n-gram size", None, _RLHF),
    "repetition_max_penalty": Option(-1.0, float, "repetition reward at full repetition", None, _RLHF),
    "soft_max_length": Option(None, int, "soft_overlong: L_max (default max_completion_length)", None, _RLHF),
    "soft_cache_length": Option(None, int, "soft_overlong: L_cache", None, _RLHF),
    "log_completions": Option(False, bool, "write sample completions to output_dir/completions.jsonl", None, _RLHF),
    # PPO
    "value_model": Option(None, str, "value model start, a reward model folder in either layout (default: "
                          "--reward_model)", None, _RLHF),
    "num_ppo_epochs": Option(4, int, "passes over each rollout", None, _RLHF),
    "num_mini_batches": Option(1, int, "mini-batches per pass (one optimizer step each)", None, _RLHF),
    "local_rollout_forward_batch_size": Option(64, int, "rows per no-grad rollout forward", None, _RLHF),
    "whiten_rewards": Option(False, bool, "whiten the per-token rewards", None, _RLHF),
    "kl_coef": Option(0.05, float, "KL penalty per token", None, _RLHF),
    "cliprange": Option(0.2, float, "policy ratio clip", None, _RLHF),
    "vf_coef": Option(0.1, float, "value loss weight", None, _RLHF),
    "cliprange_value": Option(0.2, float, "value clip", None, _RLHF),
    "gamma": Option(1.0, float, "discount", None, _RLHF),
    "lam": Option(0.95, float, "GAE lambda", None, _RLHF),
    "num_sample_generations": Option(10, int, "debug generations over the run (samples.jsonl)", None, _RLHF),
    "missing_eos_penalty": Option(None, float, "subtracted from the score of responses without EOS", None, _RLHF),
}

# ms-swift 3 spells --tuner_type as --train_type.
# ms-swift's other names for an option (max_completion_length: its max_new_tokens and PPO's response_length)
OPTION_ALIASES = {"train_type": "tuner_type", "max_new_tokens": "max_completion_length",
                  "response_length": "max_completion_length"}


def default_config(command: str) -> ml_collections.ConfigDict:
    """Every option of ``command`` at its default."""
    values = {k: o.default for k, o in OPTIONS.items() if command in o.commands}
    return ml_collections.ConfigDict(values, type_safe=False)


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Run ``get_config()`` from a Python config file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file; configs live in configs/*.py")
    spec = importlib.util.spec_from_file_location(f"jaxalign_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a user file: report it in one line
        raise ConfigError(f"--config {p}: failed to run ({type(e).__name__}: {e})") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {p}: defines no get_config() function")
    return module.get_config()


def parse_bool(value: str | bool, name: str = "option") -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"--{name} {value!r}: expected true or false")


def coerce(name: str, value: Any) -> Any:
    """Convert and check one option value; refuse it with the valid choices."""
    opt = OPTIONS[name]
    if opt.multi and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if opt.type is str and isinstance(value, (dict, ml_collections.ConfigDict)):  # a config file's mapping
        value = json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)  # (--columns)
    if value is None or (isinstance(value, str) and value.lower() == "none" and opt.default is None):
        return None
    try:
        if opt.type is bool:
            value = parse_bool(value, name)
        elif opt.type is int:
            value = int(value)
        elif opt.type is float:
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} {value!r}: expected {opt.type.__name__}") from None
    if opt.choices is not None and value not in opt.choices:
        valid = ", ".join(str(c) for c in opt.choices if c is not None)
        raise ConfigError(f"--{name} {value!r}: not one of {valid}")
    return value


def resolve(command: str, file_config: ml_collections.ConfigDict | None, flags: dict[str, Any]) -> ml_collections.ConfigDict:
    """Defaults <- config file <- flags, each value validated."""
    cfg = default_config(command)
    for layer, source in ((file_config or {}, "config file"), (flags, "command line")):
        for key, value in dict(layer).items():
            key = OPTION_ALIASES.get(key, key)
            if key not in OPTIONS or command not in OPTIONS[key].commands:
                raise ConfigError(f"{source}: unknown option {key!r}; see `jaxalign {command} --help`")
            cfg[key] = coerce(key, value)
    spec = spec_of(cfg.get("rlhf_type") or command)
    if cfg.per_device_train_batch_size is None:
        cfg.per_device_train_batch_size = default_batch_size(spec, cfg)
    if "beta" in cfg and cfg.beta is None:
        cfg.beta = spec.default_beta
    if cfg.truncation_strategy is None and spec.name == "ppo":  # ms-swift: left for GRPO's prompts only
        cfg.truncation_strategy = "delete"
    if cfg.loss_scale is None:  # ms-swift: SFT and ORPO train every reply of a text conversation, the rest the last
        cfg.loss_scale = "default" if spec.name in ("sft", "orpo") else "last_round"
    if cfg.learning_rate is None:
        cfg.learning_rate = 1e-4 if cfg.tuner_type == "lora" else 1e-5
    _check(cfg)
    check_algorithm_options(spec, cfg)
    return cfg


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: ``low``/``high`` (None: unbounded), each end closed unless
    ``low_open``/``high_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return v == v  # NaN is in no range

    def __str__(self) -> str:
        if self.high is None:
            if self.low == 0:
                return "positive" if self.low_open else ">= 0"
            if self.low == 1 and not self.low_open:
                return "positive"
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        return f"in {'(' if self.low_open else '['}{lo}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)  # > 0
AT_LEAST_ONE = Range(1)  # a positive count
NON_NEGATIVE = Range(0)  # >= 0
UNIT = Range(0, 1)  # [0, 1]
UNIT_OPEN = Range(0, 1, high_open=True)  # [0, 1)

# option -> the values it accepts (None values mean "unset" and are not checked). A new numeric option
# adds a line here; the message ("--NAME VALUE: must be ...") follows from the range.
RANGES: dict[str, Range] = {
    "max_length": AT_LEAST_ONE,
    "split_dataset_ratio": UNIT_OPEN,
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "learning_rate": NON_NEGATIVE,  # a negative rate trains by gradient ascent
    "warmup_ratio": UNIT,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": UNIT_OPEN,
    "adam_beta2": UNIT_OPEN,
    "adam_epsilon": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0 disables clipping
    "num_train_epochs": NON_NEGATIVE,
    "logging_steps": AT_LEAST_ONE,
    "eval_steps": AT_LEAST_ONE,
    "save_steps": AT_LEAST_ONE,
    "save_total_limit": AT_LEAST_ONE,
    "lora_rank": AT_LEAST_ONE,
    "lora_alpha": POSITIVE,
    "lora_dropout": Range(0, 1, high_open=True),
    # RLHF
    "beta": NON_NEGATIVE,
    "label_smoothing": Range(0, 0.5, high_open=True),
    "rpo_alpha": NON_NEGATIVE,
    "discopop_tau": POSITIVE,
    "cpo_alpha": NON_NEGATIVE,
    "desirable_weight": NON_NEGATIVE,
    "undesirable_weight": NON_NEGATIVE,
    "center_rewards_coefficient": NON_NEGATIVE,
    "max_completion_length": AT_LEAST_ONE,
    "temperature": NON_NEGATIVE,  # 0: greedy
    "top_p": Range(0, 1, low_open=True),
    "repetition_penalty": POSITIVE,
    "num_generations": AT_LEAST_ONE,
    "epsilon": NON_NEGATIVE,
    "epsilon_high": NON_NEGATIVE,
    "delta": POSITIVE,
    "tau_pos": POSITIVE,
    "tau_neg": POSITIVE,
    "num_iterations": AT_LEAST_ONE,
    "steps_per_generation": AT_LEAST_ONE,
    "max_resample_times": NON_NEGATIVE,
    "repetition_n_grams": AT_LEAST_ONE,
    "num_ppo_epochs": AT_LEAST_ONE,
    "num_mini_batches": AT_LEAST_ONE,
    "local_rollout_forward_batch_size": AT_LEAST_ONE,
    "kl_coef": NON_NEGATIVE,
    "cliprange": NON_NEGATIVE,
    "cliprange_value": NON_NEGATIVE,
    "vf_coef": NON_NEGATIVE,
    "gamma": UNIT,
    "lam": UNIT,
}


def check_ranges(cfg: ml_collections.ConfigDict) -> None:
    """Every option of :data:`RANGES` that ``cfg`` sets lies in its range; else one line naming it."""
    for key, allowed in RANGES.items():
        value = cfg.get(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"--{key} {value}: must be {allowed}")


def _check(cfg: ml_collections.ConfigDict) -> None:
    from jaxalign.data.formats import parse_columns

    check_ranges(cfg)
    _check_lora(cfg)
    parse_columns(cfg.columns)


def _check_lora(cfg: ml_collections.ConfigDict) -> None:
    """The LoRA options, checked whatever the tuner (a stray --adapters would otherwise be ignored)."""
    from jaxalign.models.lora import parse_target_modules

    lora = cfg.tuner_type == "lora"
    for key in ("adapters", "ref_adapters"):
        if cfg.get(key) and not lora:
            raise ConfigError(f"--{key} {cfg[key]}: adapters need --tuner_type lora")
    if not lora:
        return
    try:
        parse_target_modules(cfg.target_modules)
    except ValueError as e:
        raise ConfigError(f"--target_modules {cfg.target_modules}: {e}") from None
    if cfg.get("ref_model"):
        raise ConfigError("--ref_model cannot be combined with --tuner_type lora: the reference is the base model with "
                          "the adapters off (or --ref_adapters DIR); drop --ref_model")


def add_flags(parser, command: str) -> None:
    """Register every option of ``command`` as --name on an argparse parser (values validated later)."""
    parser.add_argument("--config", default=None, help="configs/NAME.py whose get_config() sets defaults")
    for name, opt in OPTIONS.items():
        if command not in opt.commands:
            continue
        extra = f" (choices: {', '.join(str(c) for c in opt.choices if c is not None)})" if opt.choices else ""
        aliases = [f"--{a}" for a, target in OPTION_ALIASES.items() if target == name]
        parser.add_argument(f"--{name}", *aliases, dest=name, default=argparse_unset, nargs="+" if opt.multi else None,
                            help=f"{opt.help}; default {opt.default!r}{extra}")


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


argparse_unset = _Unset()


def flags_from_namespace(ns) -> dict[str, Any]:
    """The options the user actually passed on the command line."""
    return {k: v for k, v in vars(ns).items() if k in OPTIONS and v is not argparse_unset}


def check_algorithm_options(spec, cfg: ml_collections.ConfigDict) -> None:
    """The options an algorithm reads, checked before any model loads (as TRL's ``__post_init__``)."""
    # Imported here: the CLI builds its parser from this module, and these pull in jax and math-verify.
    from jaxalign.losses.grpo import GRPO_LOSS_TYPES
    from jaxalign.losses.preference import KTO_LOSS_TYPES, preference_loss_types

    name = spec.name
    if spec.command != "rlhf":
        return
    for flag in ("ref_model", "ref_adapters"):  # a reference this run would not load
        if not cfg.get(flag):
            continue
        if spec.reference == "none":
            raise ConfigError(f"--{flag}: {name} uses no reference model; drop the flag")
        if spec.reference == "beta" and cfg.beta == 0:
            raise ConfigError(f"--{flag}: {name} with --beta 0 uses no reference model; drop the flag or raise --beta")
        if spec.reference == "policy" and cfg.get("reference_free"):
            raise ConfigError(f"--{flag}: --reference_free true uses no reference model; drop one of the two")
    if spec.data_kind == "pair" and name != "rm":
        preference_loss_types(name, cfg.loss_type, cfg.loss_weights)
    if name == "kto":
        if cfg.beta <= 0:
            raise ConfigError(f"--beta {cfg.beta}: KTO needs beta > 0")
        if cfg.desirable_weight < 0 or cfg.undesirable_weight < 0:
            raise ConfigError("--desirable_weight and --undesirable_weight must be >= 0")
        if cfg.loss_type not in (None, "", *KTO_LOSS_TYPES):
            raise ConfigError(f"--loss_type {cfg.loss_type!r} is not valid for kto; choose from "
                              + ", ".join(KTO_LOSS_TYPES))
        if cfg.reference_free:
            raise ConfigError("--reference_free: KTO needs a reference model; drop the flag")
        if cfg.precompute_ref_log_probs:
            raise ConfigError("--precompute_ref_log_probs is not supported for kto yet; drop the flag")
    if name == "rm" and cfg.get("rm_head") == "seq_cls" and cfg.get("tuner_type") == "lora":
        raise ConfigError("--rm_head seq_cls with --tuner_type lora: not supported yet (a LoRA reward model's adapter "
                          "is written with TRL's value head); use --tuner_type full, or --rm_head value_head")
    if name == "grpo":
        if (cfg.loss_type or "grpo") not in GRPO_LOSS_TYPES:
            raise ConfigError(f"--loss_type {cfg.loss_type!r} is not valid for grpo; choose from {', '.join(GRPO_LOSS_TYPES)}")
        if cfg.num_generations < 2:
            raise ConfigError(f"--num_generations {cfg.num_generations}: GRPO needs at least 2 completions per prompt")


def check_required_inputs(cfg: ml_collections.ConfigDict) -> None:
    """The files and functions a run cannot start without, named with the flag that gives them."""
    from jaxalign.rewards import split_names  # see check_algorithm_options

    spec = spec_of(cfg.get("rlhf_type") or "sft")
    if not cfg.model:
        raise ConfigError("--model is required: a Hugging Face model folder")
    if not cfg.dataset:
        raise ConfigError("--dataset is required: a .jsonl/.json/.csv/.parquet file or a saved dataset folder")
    if spec.name == "grpo" and not split_names(cfg.reward_funcs) and not cfg.reward_model:
        raise ConfigError("--reward_funcs: GRPO needs at least one reward function (accuracy, format, cosine, "
                          "repetition, soft_overlong, a plugin's) or --reward_model")
    if spec.reward_model and not cfg.reward_model:
        raise ConfigError(f"--reward_model is required for {spec.name}: a reward model folder "
                          "(*ForSequenceClassification, or backbone + value_head.safetensors)")
    if cfg.get("reward_model") or cfg.get("value_model"):  # the layout (config.json and files), before any model loads
        from jaxalign.convert.reward_model import reward_model_layout

        for flag in ("reward_model", "value_model"):
            if cfg.get(flag):
                reward_model_layout(cfg.get(flag), what=f"--{flag} ")
