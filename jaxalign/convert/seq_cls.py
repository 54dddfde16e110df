"""Reward models as ``*ForSequenceClassification`` folders (TRL's RewardTrainer, ms-swift 4, public RMs).

Such a folder holds the backbone (``model.*``) and a ``score.weight`` [num_labels, hidden] head without
bias, and no LM head. jaxalign's :class:`RewardModel` is the same backbone with a value head that has a
bias, so the two layouts convert into each other except for that bias: it is dropped towards the
sequence-classification layout (it shifts every score equally, so pair rankings and Bradley-Terry
losses are unchanged) and set to 0 the other way.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxalign.convert.hf_load import load_decoder, open_weights, read_config
from jaxalign.convert.hf_save import hf_tensors, save_hf_model
from jaxalign.convert.value_head_io import (
    VALUE_HEAD_FILE,
    WEIGHT,
    load_value_head_reward_model,
    place_on_mesh,
    save_reward_model,
    value_head_tensors,
)
from jaxalign.data.tokenizer import load_tokenizer_if_present
from jaxalign.errors import CheckpointError
from jaxalign.models.value_head import RewardModel, ValueHead

SCORE = "score.weight"  # [num_labels, hidden]
SEQ_CLS_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
}


def is_seq_cls_folder(path: str | Path) -> bool:
    """Whether ``path/config.json`` names a ``*ForSequenceClassification`` architecture."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except ValueError:
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_seq_cls_reward_model(path: str | Path, *, dtype: str = "float32", mesh=None) -> RewardModel:
    """A ``*ForSequenceClassification`` folder with one label as a RewardModel (value-head bias 0)."""
    folder = Path(path)
    config = read_config(folder)
    # No LM head is stored; tying it to the embeddings lets the backbone load (scores never use it).
    config = dataclasses.replace(config, tie_word_embeddings=True)
    tensors = open_weights(folder)
    if SCORE not in tensors:
        raise CheckpointError(f"{folder}: no {SCORE!r} tensor; not a sequence-classification reward model")
    score_file = tensors.pop(SCORE)
    shape = tuple(score_file.shape(SCORE))
    if shape != (1, config.hidden_size):
        raise CheckpointError(
            f"{score_file.path}: {SCORE!r} has shape {list(shape)}; a reward model has one label "
            f"([1, {config.hidden_size}]), so this classifier cannot serve as one"
        )
    backbone = load_decoder(folder, config, tensors, dtype=dtype, mesh=mesh)
    head = ValueHead(config.hidden_size, rngs=nnx.Rngs(0))
    head.summary.kernel[...] = np.asarray(score_file.get(SCORE), np.float32).T
    head.summary.bias[...] = np.zeros((1,), np.float32)
    # transformers picks the scored token by config.json's pad_token_id (None: the last position)
    return RewardModel(backbone, place_on_mesh(head, mesh), head="seq_cls", pad_token_id=config.pad_token_id)


def value_head_bias(model: RewardModel) -> float:
    return float(np.asarray(jax.device_get(model.v_head.summary.bias[...]))[0])


def seq_cls_hf_config(model: RewardModel, tokenizer=None) -> dict:
    """config.json of the sequence-classification folder: one label, the same backbone. Its pad_token_id is the
    one the model scores with (else the tokenizer's): transformers needs one to score a padded batch."""
    out = model.backbone.config.to_hf_dict()
    pad = model.pad_token_id if model.head == "seq_cls" else None
    if pad is None:
        pad = out.get("pad_token_id")
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is not None:
        out["pad_token_id"] = int(pad)
    out["architectures"] = [SEQ_CLS_ARCHITECTURES[model.backbone.config.model_type]]
    out["num_labels"] = 1
    out["id2label"] = {"0": "LABEL_0"}
    out["label2id"] = {"LABEL_0": 0}
    return out


def save_seq_cls_model(model: RewardModel, path: str | Path, *, tokenizer=None, **kw) -> Path:
    """Write ``model`` as a ``*ForSequenceClassification`` folder (backbone + ``score.weight``; the
    value head's bias is not carried: see :func:`value_head_bias`), atomically."""

    def tensors():
        for name, arr in hf_tensors(model.backbone):
            if name != "lm_head.weight":
                yield name, arr
        yield SCORE, value_head_tensors(model.v_head)[WEIGHT]

    return save_hf_model(model.backbone, path, tokenizer=tokenizer, tensors=tensors(),
                         hf_config=seq_cls_hf_config(model, tokenizer), **kw)


def causal_lm_hf_config(model: RewardModel) -> dict:
    """config.json of the value-head layout's backbone: a causal LM whose head is tied to the embeddings."""
    out = model.backbone.config.to_hf_dict()
    for key in ("num_labels", "id2label", "label2id", "problem_type"):
        out.pop(key, None)
    out["tie_word_embeddings"] = model.backbone.config.tie_word_embeddings
    return out


def convert_reward_model(input_dir: str | Path, output_dir: str | Path, *, to: str = "auto") -> list[str]:
    """Re-write a reward model folder in the other layout (``to``: auto, seq_cls or value_head);
    returns the lines to tell the user."""
    src = Path(input_dir)
    seq_cls = is_seq_cls_folder(src)
    if not seq_cls and not (src / VALUE_HEAD_FILE).is_file():
        raise CheckpointError(f"{src}: neither a *ForSequenceClassification folder nor a folder with {VALUE_HEAD_FILE}; "
                              "pass a reward model folder")
    target = to if to != "auto" else ("value_head" if seq_cls else "seq_cls")
    if (target == "seq_cls") == seq_cls:
        raise CheckpointError(f"--to {target}: {src} is already in that layout")
    tokenizer = load_tokenizer_if_present(src)
    if seq_cls:
        model = load_seq_cls_reward_model(src)
        out = save_reward_model(model, output_dir, tokenizer=tokenizer, hf_config=causal_lm_hf_config(model))
        return [f"converted {src} (sequence classification) -> {out} (value head, bias 0; "
                "LM head tied to the embeddings)"]
    model = load_value_head_reward_model(src)
    out = save_seq_cls_model(model, output_dir, tokenizer=tokenizer)
    lines = [f"converted {src} (value head) -> {out} (sequence classification)"]
    bias = value_head_bias(model)
    if bias != 0.0:
        lines.append(f"note: the value head's bias {bias:.6g} is not carried (a score head has none); "
                     "every score is lower by that constant, pair rankings are unchanged")
    return lines
