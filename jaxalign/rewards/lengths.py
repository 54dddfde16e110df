"""Completion lengths for the length-based rewards (cosine, soft_overlong).

ms-swift measures a completion in tokens via the ``response_token_ids`` column. Here the length of
row ``i`` is, in order of preference:

1. ``len(completion_ids[i])`` when the GRPO trainer passes the ``completion_ids`` column
   (list of lists of token ids), or ms-swift's ``response_token_ids`` column;
2. ``len(tokenizer.encode(completion, add_special_tokens=False))`` when the reward was built with a
   tokenizer (any object with ``encode``, or a plain callable ``str -> list``);
3. the number of characters, ``len(completion)``, otherwise.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

TOKEN_ID_COLUMNS = ("completion_ids", "response_token_ids")


def _tokenize(tokenizer: Any, text: str) -> Sequence[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # tokenizers.Tokenizer or a minimal encode(text)
            encoded = tokenizer.encode(text)
            return getattr(encoded, "ids", encoded)
    if callable(tokenizer):
        return tokenizer(text)
    raise TypeError(f"tokenizer must have .encode or be callable, got {type(tokenizer).__name__}")


def completion_lengths(
    completions: Sequence[str], columns: dict[str, Any], tokenizer: Any | Callable[[str], Sequence[int]] = None
) -> list[int]:
    """Length of each completion: token ids column, else the tokenizer, else characters (see module doc)."""
    for key in TOKEN_ID_COLUMNS:
        ids = columns.get(key)
        if ids is not None:
            return [len(row) for row in ids]
    if tokenizer is not None:
        return [len(_tokenize(tokenizer, text)) for text in completions]
    return [len(text) for text in completions]
