"""LoRA adapters in PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Tensor names are PEFT's for a causal LM, ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``
([r, in]) and ``...lora_B.weight`` ([out, r]); jaxalign holds the transposes (``a`` [in, r], ``b`` [r, out]).
``PeftModel.from_pretrained`` loads what :func:`save_adapter` writes, and :func:`apply_adapter` reads
adapters PEFT wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxalign.convert.hf_save import remove_stale_staging
from jaxalign.errors import CheckpointError
from jaxalign.models.lora import LoRASettings, add_lora, lora_modules, parse_target_modules

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model.model."


def _module_name(path: tuple, layer: int) -> str:
    """A linear layer's path inside a decoder's stacked layers and a layer index -> its PEFT module name
    (without the lora suffix): ``base_model.model.model.layers.N.self_attn.q_proj``."""
    start = list(path).index("layers")
    return _PREFIX + ".".join(str(p) for p in ("layers", layer, *path[start + 1:]))


def adapter_tensors(decoder) -> dict[str, np.ndarray]:
    """Every adapter of ``decoder`` as PEFT names and lays it out (float32 numpy), one pair per layer."""
    out = {}
    for path, lora in lora_modules(decoder).items():
        a = np.asarray(jax.device_get(lora.a[...]), np.float32)  # [L, in, r]
        b = np.asarray(jax.device_get(lora.b[...]), np.float32)  # [L, r, out]
        for i in range(a.shape[0]):
            name = _module_name(path, i)
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def adapter_config(settings: LoRASettings, base_model: str | None) -> dict:
    """PEFT's ``LoraConfig`` fields for these settings."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_model).absolute()) if base_model else None,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(settings.target_modules),
        "use_rslora": settings.use_rslora,
        "init_lora_weights": settings.init_lora_weights,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def save_adapter(decoder, folder: str | Path, *, settings: LoRASettings, base_model: str | None, tokenizer=None,
                 extra_files=None) -> Path:
    """Write ``folder/adapter_model.safetensors`` and ``folder/adapter_config.json`` (and the tokenizer, and
    whatever ``extra_files(staging)`` writes), staged beside and moved in only when complete."""
    dst = Path(folder)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a folder; choose another --output_dir")
    tensors = adapter_tensors(decoder)
    if jax.process_index() != 0:
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dst / "adapter")  # .adapter.tmp-PID folders of killed exports
    staging = dst / f".adapter.tmp-{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(settings, base_model), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if extra_files is not None:
            extra_files(staging)
        for item in staging.iterdir():
            os.replace(item, dst / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path, flag: str = "--adapters") -> tuple[LoRASettings, str | None]:
    """(settings, base model path) from a PEFT ``adapter_config.json``; refuses what jaxalign cannot run."""
    src = Path(folder) / ADAPTER_CONFIG
    if not src.is_file():
        raise CheckpointError(f"{flag} {folder}: no {ADAPTER_CONFIG}; expected a LoRA adapter folder (PEFT format)")
    try:
        raw = json.loads(src.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{src}: not valid JSON ({e})") from None
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{src}: peft_type {raw.get('peft_type')!r}; jaxalign reads LoRA adapters only")
    for key in ("use_dora",):
        if raw.get(key):
            raise CheckpointError(f"{src}: {key} is set; jaxalign reads plain LoRA adapters only")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise CheckpointError(f"{src}: {key} gives per-layer ranks; jaxalign reads one rank for all layers")
    if raw.get("layers_to_transform") is not None:
        raise CheckpointError(f"{src}: layers_to_transform is set; jaxalign adapts every layer")
    try:
        rank = int(raw["r"])
        targets = parse_target_modules(raw.get("target_modules"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{src}: bad r or target_modules ({e})") from None
    if rank <= 0:
        raise CheckpointError(f"{src}: r is {rank}; must be positive")
    settings = LoRASettings(
        rank=rank, alpha=float(raw.get("lora_alpha", 8)), dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
        target_modules=targets, use_rslora=bool(raw.get("use_rslora", False)),
    )
    return settings, raw.get("base_model_name_or_path")


def load_adapter_weights(decoder, folder: str | Path, flag: str = "--adapters") -> None:
    """Set the adapters already attached to ``decoder`` from ``folder``'s safetensors, checking names and shapes."""
    src = Path(folder) / ADAPTER_WEIGHTS
    if not src.is_file():
        raise CheckpointError(f"{flag} {folder}: no {ADAPTER_WEIGHTS} (.bin adapters are not read; re-save with "
                              "safe_serialization)")
    try:
        tensors = load_file(str(src))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{src}: not a readable safetensors file ({e})") from None
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    used = set()
    for path, lora in lora_modules(decoder).items():
        for part, var in (("lora_A", lora.a), ("lora_B", lora.b)):
            layers, want = var.shape[0], tuple(reversed(var.shape[1:]))
            stacked = []
            for i in range(layers):
                key = f"{_module_name(path, i)}.{part}.weight"
                if key not in tensors:
                    raise CheckpointError(f"{src}: tensor {key} is missing; the adapter does not fit this model")
                if tuple(tensors[key].shape) != want:
                    raise CheckpointError(f"{src}: tensor {key} has shape {list(tensors[key].shape)}, this model "
                                          f"needs {list(want)}; the adapter was trained for another model")
                stacked.append(np.asarray(tensors[key], np.float32).T)
                used.add(key)
            arr = np.stack(stacked)
            sharding = getattr(var[...], "sharding", None)
            var[...] = jax.device_put(arr, sharding) if sharding is not None else arr
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{src}: tensor {extra[0]} names no adapted layer of this model; the adapter does not fit")


def apply_adapter(decoder, folder: str | Path, *, flag: str = "--adapters") -> LoRASettings:
    """Attach the adapter in ``folder`` (its config's rank, alpha and targets) to ``decoder``; returns its settings."""
    settings, _ = read_adapter_config(folder, flag)
    add_lora(decoder, settings)
    load_adapter_weights(decoder, folder, flag)
    return settings
