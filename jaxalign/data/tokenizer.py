"""Tokenizers saved beside models: loading (never downloading), the pad id and the stop ids."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from jaxalign.data.template import GEMMA_END_OF_TURN, GEMMA_MODEL_TYPES
from jaxalign.errors import CheckpointError
from jaxalign.rollout.generate import default_stop_token_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_folder(path: str | Path) -> Path | None:
    """Where the tokenizer of a model folder lives: the folder itself, its ``tokenizer/``, or (for
    ``output_dir/checkpoint-N``) the run's ``output_dir/tokenizer``; None when there is none."""
    p = Path(path)
    for cand in (p, p / "tokenizer", p.parent / "tokenizer"):
        if any((cand / name).is_file() for name in TOKENIZER_FILES):
            return cand
    return None


def load_tokenizer(path: str | Path, *, training: bool = True):
    """The tokenizer saved with a model (no download); refuse a folder without one. For training a
    missing pad token becomes the EOS token."""
    folder = tokenizer_folder(path)
    if folder is None:
        if not Path(path).exists():
            raise CheckpointError(f"{path}: no such model folder; pass a Hugging Face model directory")
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                              "save the tokenizer with the model")
    tok = AutoTokenizer.from_pretrained(str(folder))
    if training and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer_if_present(folder: str | Path):
    """The folder's own tokenizer, unchanged, when it has one (for copying into an export), else None."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def stop_token_ids(tokenizer, config) -> tuple[int, ...]:
    """Ids that end a sampled completion: the model's EOS ids (config.json, generation_config.json),
    then the tokenizer's EOS, then for a Gemma model ``<end_of_turn>`` (its chat turns end there, and a base
    model's config names only ``<eos>``); ``(-1,)`` (nothing stops) when there are none."""
    ids = list(default_stop_token_ids(config))
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if tokenizer is not None and getattr(config, "model_type", None) in GEMMA_MODEL_TYPES:
        turn_end = end_of_turn_id(tokenizer)
        if turn_end is not None and turn_end not in ids:
            ids.append(turn_end)
    return tuple(ids) or (-1,)


def end_of_turn_id(tokenizer) -> int | None:
    """The id of Gemma's ``<end_of_turn>`` when the tokenizer has it as one token, else None."""
    tid = tokenizer.convert_tokens_to_ids(GEMMA_END_OF_TURN)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        return None
    return int(tid)
