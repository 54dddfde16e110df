"""Reward models in either layout the ecosystem ships, told apart by ``config.json`` as ms-swift does.

* ``seq_cls``: a ``*ForSequenceClassification`` folder (``architectures`` ends in
  ``ForSequenceClassification``, one label): backbone + ``score.weight`` [1, hidden], no bias, no LM head.
  TRL's ``RewardTrainer``, ms-swift 4 and public reward models write this.
* ``value_head``: a causal-LM folder plus ``value_head.safetensors`` (TRL's value head, with bias), what
  jaxalign's ``--rm_head value_head`` (the default) and older ms-swift write.

:func:`load_reward_model` reads either into a :class:`~jaxalign.models.value_head.RewardModel` whose ``head``
records the layout (and so how it scores); :func:`save_reward_model_folder` writes a model back in its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxalign.convert.seq_cls import SEQ_CLS_ARCHITECTURES, load_seq_cls_reward_model, save_seq_cls_model
from jaxalign.convert.value_head_io import VALUE_HEAD_FILE, load_value_head_reward_model, save_reward_model, value_head_writer
from jaxalign.errors import CheckpointError
from jaxalign.models.config import SUPPORTED_MODEL_TYPES
from jaxalign.models.value_head import RewardModel

_SUPPORTED = ", ".join(SEQ_CLS_ARCHITECTURES[t] for t in SUPPORTED_MODEL_TYPES)


def _config_json(folder: Path, what: str) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        out = json.loads(cfg.read_text())
    except ValueError as e:
        raise CheckpointError(f"{what}{cfg}: not valid JSON ({e}); restore the file") from None
    return out if isinstance(out, dict) else None


def num_labels_of(hf_config: dict) -> int:
    """Labels of a classifier's config.json as transformers counts them (``id2label``, else ``num_labels``,
    else its default 2)."""
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return int(hf_config.get("num_labels", 2))


def reward_model_layout(path: str | Path, *, what: str = "") -> str:
    """``seq_cls`` or ``value_head`` for a reward-model folder; a one-line CheckpointError (naming the file and
    the fix) for anything else. ``what`` prefixes the message (``"--reward_model "``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{what}{folder}: no such folder; pass a reward model folder "
                              "(a *ForSequenceClassification model, or a model with value_head.safetensors)")
    hf = _config_json(folder, what)
    archs = [str(a) for a in (hf or {}).get("architectures") or []]
    cls = next((a for a in archs if a.endswith("ForSequenceClassification")), None)
    if cls is not None:
        model_type = str(hf.get("model_type", "?"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{what}{folder / 'config.json'}: {cls} (model_type {model_type!r}) has no backbone jaxalign "
                f"supports; use a reward model built on {_SUPPORTED}")
        n = num_labels_of(hf)
        if n != 1:
            raise CheckpointError(
                f"{what}{folder / 'config.json'}: {cls} has num_labels {n}; a reward model has one label (one score "
                "per sequence): use a classifier saved with num_labels=1")
        return "seq_cls"
    if (folder / VALUE_HEAD_FILE).is_file():
        return "value_head"
    if hf is None:
        raise CheckpointError(f"{what}{folder / 'config.json'}: missing; pass a reward model folder "
                              "(a *ForSequenceClassification model, or a model with value_head.safetensors)")
    raise CheckpointError(
        f"{what}{folder / VALUE_HEAD_FILE}: missing, and config.json names no *ForSequenceClassification "
        f"architecture ({', '.join(archs) or 'none'}); {folder} is not a reward model: train one with "
        "`jaxalign rlhf --rlhf_type rm` or pass a sequence-classification reward model")


def load_reward_model(path: str | Path, *, dtype: str = "float32", mesh=None, what: str = "") -> RewardModel:
    """A reward model folder in either layout (see the module docstring) as a RewardModel; its scores equal
    ``transformers``' ``AutoModelForSequenceClassification`` logits for a seq_cls folder, and TRL's value head
    at the last attended token for a value-head folder."""
    if reward_model_layout(path, what=what) == "seq_cls":
        return load_seq_cls_reward_model(path, dtype=dtype, mesh=mesh)
    return load_value_head_reward_model(path, dtype=dtype, mesh=mesh)


def save_reward_model_folder(model: RewardModel, path: str | Path, *, tokenizer=None, **kw) -> Path:
    """``model`` in its own layout: a ``*ForSequenceClassification`` folder (seq_cls) or the backbone with
    ``value_head.safetensors`` (value_head); written atomically."""
    if model.head == "seq_cls":
        return save_seq_cls_model(model, path, tokenizer=tokenizer, **kw)
    return save_reward_model(model, path, tokenizer=tokenizer, **kw)


def head_files(model: RewardModel):
    """``extra_files`` for a LoRA adapter of a reward model: the trained head beside the adapter (TRL's
    ``value_head.safetensors``; a seq_cls head is written there with bias 0). The head is gathered now, on
    every host; the single writer writes it."""
    return value_head_writer(model.v_head)
