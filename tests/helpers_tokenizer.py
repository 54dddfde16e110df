"""Test helpers: the tiny char tokenizer and hand-readable token ids.

Ids of the default char tokenizer: <|pad|>=0, <|im_start|>=1, <|im_end|>=2,
<|endoftext|>=3, <|unk|>=4, '0'..'9'=5..14, 'a'..'z'=15..40, ' '=41, '+'=42, '='=45, '\\n'=57.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxalign.data.tiny_tokenizer import DEFAULT_CHARS, SPECIAL_TOKENS, build_char_tokenizer

PAD, IM_START, IM_END, ENDOFTEXT, UNK = range(5)
_SPECIAL = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

_TOKENIZER = None


def tokenizer() -> Any:
    """A shared instance of the default char tokenizer (building one takes a few ms)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_char_tokenizer()
    return _TOKENIZER


def ids(*parts: str | int) -> list[int]:
    """Expected ids: strings are spelled char by char (special-token names map whole), ints pass."""
    out: list[int] = []
    for part in parts:
        if isinstance(part, int):
            out.append(part)
        elif part in _SPECIAL:
            out.append(_SPECIAL[part])
        else:
            out.extend(len(SPECIAL_TOKENS) + DEFAULT_CHARS.index(ch) for ch in part)
    return out


def chatml(*turns: tuple[str, str]) -> list[int]:
    """Expected ids of ChatML turns ``(role, content)``, each ending ``<|im_end|>\\n``."""
    out: list[int] = []
    for role, content in turns:
        out += ids(IM_START, role + "\n" + content, IM_END, "\n")
    return out


def write_jsonl(path: str, rows: list[Any]) -> str:
    """Write rows (dicts, or raw strings written as-is) one per line; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def here() -> str:
    return os.path.dirname(os.path.abspath(__file__))
