"""``--tuner_type lora`` for every algorithm: adapters onto the prepared module, the adapters-off reference,
and the adapter export.

What trains is decided by :func:`jaxalign.models.lora.trainable_filter` when the Trainer splits the
module, so the loop, the optimizer (its state shrinks to the adapters) and the checkpoints (trainable
state only) need nothing else.
"""

from __future__ import annotations

from flax import nnx

from jaxalign.convert.peft_io import load_adapter_weights, read_adapter_config, save_adapter
from jaxalign.errors import ConfigError
from jaxalign.models.lora import (
    LoRASettings,
    add_lora,
    adapters_off,
    lora_modules,
    parse_target_modules,
    trainable_filter,
)


def lora_settings(cfg) -> LoRASettings:
    return LoRASettings(
        rank=int(cfg.lora_rank), alpha=float(cfg.lora_alpha), dropout=float(cfg.lora_dropout),
        target_modules=parse_target_modules(cfg.target_modules), use_rslora=bool(cfg.use_rslora),
        init_lora_weights=bool(cfg.init_lora_weights),
    )


def apply_tuner(cfg, algorithm, module: nnx.Module) -> nnx.Module:
    """Under ``--tuner_type lora``: adapters on every decoder in ``module`` (PPO: policy and value model), the
    policy's read from ``--adapters`` when given (its own rank, alpha and targets). Sets ``algorithm.lora``."""
    if cfg.get("tuner_type", "full") != "lora":
        return module
    policy = algorithm.policy(module)
    if cfg.get("adapters"):
        settings, _ = read_adapter_config(cfg.adapters, "--adapters")
        add_lora(policy, settings, seed=int(cfg.seed))
        load_adapter_weights(policy, cfg.adapters, "--adapters")
    else:
        settings = lora_settings(cfg)
    # Fresh adapters wherever none is attached yet (everything, or PPO's value model after --adapters).
    fresh = lora_settings(cfg)
    _add_missing(module, fresh, seed=int(cfg.seed) + 1)
    if not lora_modules(policy):
        raise ConfigError(f"--target_modules {cfg.target_modules}: no layer of the model matched")
    algorithm.lora = settings
    return module


def _add_missing(module: nnx.Module, settings: LoRASettings, seed: int) -> None:
    """Adapters on the target layers that have none (a decoder not yet adapted)."""
    from jaxalign.models.decoder import Decoder

    for _, node in nnx.iter_graph(module):
        if isinstance(node, Decoder) and not lora_modules(node):
            add_lora(node, settings, seed=seed)


def lora_reference(algorithm, trainer):
    """The reference as trainable-shaped params: the adapters zeroed (the base exactly), or the adapter in
    ``--ref_adapters`` (rescaled to the trained adapters' alpha/r)."""
    cfg = algorithm.cfg
    off = adapters_off(trainer.state.params)
    if not cfg.get("ref_adapters"):
        return off
    settings, _ = read_adapter_config(cfg.ref_adapters, "--ref_adapters")
    mine = algorithm.lora
    if (settings.rank, settings.target_modules) != (mine.rank, mine.target_modules):
        raise ConfigError(
            f"--ref_adapters {cfg.ref_adapters}: rank {settings.rank} on {','.join(settings.target_modules)} differs "
            f"from the trained adapters' rank {mine.rank} on {','.join(mine.target_modules)}; pass the same --lora_rank "
            "and --target_modules (or --adapters with the same folder)"
        )
    ref_module = nnx.merge(trainer.graphdef, off, trainer.rest)
    policy = algorithm.policy(ref_module)
    load_adapter_weights(policy, cfg.ref_adapters, "--ref_adapters")
    ratio = settings.scaling / mine.scaling
    if ratio != 1.0:
        for lora in lora_modules(policy).values():
            lora.b[...] = lora.b[...] * ratio
    return nnx.state(ref_module, trainable_filter(ref_module))


def export_adapter(algorithm, trainer, module: nnx.Module, folder, *, base_model: str, extra_files=None) -> None:
    """``module``'s adapters (a decoder, or a reward model's backbone) in PEFT's format in ``folder``."""
    save_adapter(module, folder, settings=algorithm.lora, base_model=base_model, tokenizer=trainer.tokenizer,
                 extra_files=extra_files)
