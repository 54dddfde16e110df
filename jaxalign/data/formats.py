"""Normalise ms-swift row formats into canonical :class:`Example` conversations.

Accepted conversation columns, in order of preference:
``messages`` (roles system/user/assistant/tool, plus ms-swift's tool_call/tool_response);
ShareGPT's ``conversation`` (``{"human", "assistant"}`` pairs) or ``conversations`` (from/value turns);
ms-swift's ``system``/``query``/``response``/``history`` columns (``query`` may also be
called prompt/question/problem/instruction(+input)/input; ``response`` answer/output/completion/
targets/target/answer_key/answers/solution/text/content); TRL's ``prompt``/``chosen``/``rejected``
preference columns. Rows with media (``images``, ``videos``, ``audios``, ``objects``) are refused.
Per task kind: ``"sft"`` a conversation ending with an assistant reply; ``"pair"`` (dpo, cpo,
orpo, simpo, rm) adds ``rejected_response`` or ``rejected_messages`` and an optional
numeric ``margin``; ``"kto"`` adds a boolean ``label``; ``"prompt"`` (grpo, ppo) keeps the
prompt only (a final assistant reply is dropped) and carries every other column as extras.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxalign.algorithms import ALGORITHMS
from jaxalign.data.rows import Row
from jaxalign.errors import ConfigError, DataError

Message = dict[str, Any]

TASK_KINDS: tuple[str, ...] = ("sft", "pair", "kto", "prompt")
KIND_OF: dict[str, str] = {
    **{name: spec.data_kind for name, spec in ALGORITHMS.items()},
    **{kind: kind for kind in TASK_KINDS},
}
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool_call": "assistant",
    "tool": "tool",
    "tool_response": "tool",
}
# ms-swift's column auto-mapping. `input` comes last: an Alpaca row's query is its instruction plus its input.
QUERY_KEYS: tuple[str, ...] = ("query", "prompt", "question", "problem", "instruction", "input")
RESPONSE_KEYS: tuple[str, ...] = ("response", "answer", "output", "completion", "targets", "target", "answer_key",
                                  "answers", "solution", "text", "content")
# Columns of multimodal rows: jaxalign trains text-only decoders, so a row with media is refused, not trained as
# its text alone.
MEDIA_KEYS: tuple[str, ...] = ("images", "videos", "audios", "rejected_images", "rejected_videos", "rejected_audios",
                               "objects")
SYSTEM_KEYS: tuple[str, ...] = ("system", "system_prompt")

_NEEDS: dict[str, str] = {
    "sft": '"messages" ending with an assistant reply (or "query"/"response" columns)',
    "pair": '"messages" plus "rejected_response" or "rejected_messages"',
    "kto": '"messages" ending with an assistant reply plus a boolean "label"',
    "prompt": '"messages" ending with a user turn (or a "query" column)',
}


@dataclass(frozen=True)
class Example:
    """A validated row: the conversation plus what its task kind needs.

    ``messages`` is the full conversation (sft, pair: the chosen one, kto) or the prompt only
    (prompt kind). ``extras`` holds the columns not used for the conversation (e.g.
    ``solution``), passed to GRPO reward functions.
    """

    messages: list[Message]
    where: str
    rejected_messages: list[Message] | None = None
    label: bool | None = None
    margin: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # function definitions the chat template renders into the prompt


class BadRow(Exception):
    """Internal: a row problem, turned into a DataError with the row's place."""


def parse_columns(value: str | dict | None) -> dict[str, str] | None:
    """``--columns``: a JSON object renaming dataset columns, ``{"source name": "name jaxalign reads"}``
    (ms-swift's ``--columns '{"question": "query", "answer": "response"}'``); None when not given."""
    if value is None or value == "":
        return None
    mapping = value
    if isinstance(value, str):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--columns {value!r}: not JSON ({e.msg}); pass an object such as "
                              """'{"question": "query", "answer": "response"}'""") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ConfigError(f"--columns {value!r}: must be a JSON object of column names to column names, such as "
                          """'{"question": "query", "answer": "response"}'""")
    return dict(mapping) or None


def task_kind(task: str) -> str:
    """Map an ``--rlhf_type`` (or a kind) to one of :data:`TASK_KINDS`."""
    try:
        return KIND_OF[str(task).lower()]
    except KeyError:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(KIND_OF)}") from None


def task_name(task: str) -> str:
    """How errors name a task's rows: the rlhf_type in capitals ("DPO"), or the kind's name."""
    if str(task).lower() not in TASK_KINDS:
        return str(task).upper()
    return {"sft": "SFT", "pair": "preference", "kto": "KTO", "prompt": "prompt"}[task_kind(task)]


def normalize_rows(
    rows: Iterable[Row], task: str, *, ignore_bad_rows: bool = False
) -> tuple[list[Example], int]:
    """Validate and normalise ``rows`` for ``task`` (an rlhf_type such as "dpo", or a kind).

    Returns ``(examples, n_bad)``. A bad row raises :class:`DataError` naming its file and
    line, unless ``ignore_bad_rows``: then it is skipped and counted in ``n_bad``.
    """
    kind, name = task_kind(task), task_name(task)
    examples: list[Example] = []
    n_bad = 0
    for row in rows:
        try:
            if row.error is not None:
                raise BadRow(row.error)
            examples.append(normalize_row(row, kind, name=name))
        except BadRow as e:
            if not ignore_bad_rows:
                raise DataError(f"{row.where}: {e}; fix the row or pass --ignore_bad_rows") from None
            n_bad += 1
    return examples, n_bad


def normalize_row(row: Row, kind: str, *, name: str = "") -> Example:
    """Normalise one row (raises :class:`BadRow` with the problem, without the place)."""
    data = row.data
    name = name or kind
    media = next((k for k in MEDIA_KEYS if data.get(k) not in (None, [], "", {})), None)
    if media is not None:
        raise BadRow(f'"{media}": multimodal rows are not supported (jaxalign trains text-only models); drop the '
                     f'column or the row')
    messages, used = _conversation(data, kind, name)
    extras = {k: v for k, v in data.items() if k not in used}
    tools = _tools(data.get("tools"))
    if kind == "prompt":
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        _check_roles(messages, "messages")
        if not messages or messages[-1]["role"] != "user":
            raise BadRow(f'"messages" must end with a user turn ({name} rows need {_NEEDS[kind]})')
        return Example(messages, row.where, extras=extras, tools=tools)

    _check_roles(messages, "messages")
    _check_ends_with_reply(messages, "messages", name, kind)
    if kind == "sft":
        return Example(messages, row.where, extras=extras, tools=tools)
    if kind == "kto":
        if "label" not in data or data["label"] is None:
            raise BadRow(f'missing "label" ({name} rows need {_NEEDS[kind]})')
        label = data["label"]
        if not isinstance(label, (bool, np.bool_)):
            raise BadRow(f'"label" must be true or false, got {label!r}')
        extras.pop("label", None)
        return Example(messages, row.where, label=bool(label), extras=extras, tools=tools)
    # pair
    rejected = _rejected(data, messages, name)
    margin = _margin(data)
    for key in ("rejected_response", "rejected_messages", "rejected", "margin"):
        extras.pop(key, None)
    return Example(messages, row.where, rejected_messages=rejected, margin=margin, extras=extras, tools=tools)


def _conversation(data: dict[str, Any], kind: str, name: str) -> tuple[list[Message], set[str]]:
    """Build the message list and report which columns it consumed."""
    if data.get("messages") is not None:
        return _parse_messages(data["messages"], "messages"), {"messages"}
    for key in ("conversation", "conversations"):  # ShareGPT: {"human", "assistant"} pairs or from/value turns
        if data.get(key) is not None:
            return _sharegpt(data, key), {key, *(k for k in SYSTEM_KEYS if k in data)}
    used: set[str] = set()
    messages: list[Message] = []
    system_key = next((k for k in SYSTEM_KEYS if _present(data.get(k))), None)
    if system_key:
        messages.append({"role": "system", "content": _text(data[system_key], system_key)})
        used.add(system_key)
    for key in SYSTEM_KEYS:
        if key in data and data[key] is None:
            used.add(key)
    query_key = next((k for k in QUERY_KEYS if data.get(k) is not None), None)
    if query_key is None:
        raise BadRow(f'missing "messages" ({name} rows need {_NEEDS[kind]})')
    history = data.get("history")
    if history is not None:
        used.add("history")
        if not isinstance(history, (list, tuple)):
            raise BadRow('"history" must be a list of [query, response] pairs')
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise BadRow(f'"history"[{i}] must be a [query, response] pair')
            messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
            messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    elif "history" in data:
        used.add("history")
    prompt = data[query_key]
    used.add(query_key)
    if isinstance(prompt, (list, tuple)):  # TRL conversational prompt
        messages.extend(_parse_messages(prompt, query_key))
    else:
        query = _text(prompt, query_key)
        if query_key == "instruction" and _present(data.get("input")):
            query = query + "\n" + _text(data["input"], "input")
            used.add("input")
        messages.append({"role": "user", "content": query})
    if kind == "prompt":
        return messages, used
    response_key = "chosen" if data.get("chosen") is not None else next(
        (k for k in RESPONSE_KEYS if data.get(k) is not None), None)
    if response_key is not None:
        if response_key != "solution":  # ms-swift keeps `solution` as its own column too
            used.add(response_key)
        response = data[response_key]
        if isinstance(response, (list, tuple)):
            messages.extend(_parse_messages(response, response_key))
        else:
            messages.append({"role": "assistant", "content": _text(response, response_key)})
    return messages, used


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """The ``tools`` column: a list of function definitions, or its JSON text (ms-swift takes either)."""
    if value is None or (isinstance(value, (str, list, tuple)) and not len(value)):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(f'"tools" is not valid JSON ({e.msg} at character {e.pos})') from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise BadRow('"tools" must be a list of function definitions (objects), or its JSON text')
    return list(value) or None


def _sharegpt(data: dict[str, Any], key: str) -> list[Message]:
    """ShareGPT rows as ms-swift reads them: ``[{"human": q, "assistant": r}, ...]`` (a last pair may lack its
    reply) or turns with from/value (role/content), after an optional system column."""
    turns = data[key]
    system_key = next((k for k in SYSTEM_KEYS if _present(data.get(k))), None)
    messages = [{"role": "system", "content": _text(data[system_key], system_key)}] if system_key else []
    if not isinstance(turns, (list, tuple)) or not turns or not all(isinstance(t, dict) for t in turns):
        raise BadRow(f'"{key}" must be a non-empty list of {{"human": ..., "assistant": ...}} objects')
    if not any("human" in t or "assistant" in t for t in turns):
        return messages + _parse_messages(turns, key)
    for i, turn in enumerate(turns):
        if turn.get("human") is None:
            raise BadRow(f'"{key}"[{i}] has no "human" turn')
        messages.append({"role": "user", "content": _text(turn["human"], f"{key}[{i}].human")})
        if turn.get("assistant") is not None:
            messages.append({"role": "assistant", "content": _text(turn["assistant"], f"{key}[{i}].assistant")})
        elif i != len(turns) - 1:
            raise BadRow(f'"{key}"[{i}] has no "assistant" reply (only the last pair may lack one)')
    return messages


def _parse_messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRow(f'"{key}" must be a non-empty list of {{"role": ..., "content": ...}} objects')
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadRow(f'"{key}"[{i}] must be an object with "role" and "content"')
        role = msg.get("role", msg.get("from"))
        if role is None:
            raise BadRow(f'"{key}"[{i}] has no "role"')
        canon = ROLE_ALIASES.get(str(role))
        if canon is None:
            raise BadRow(f'"{key}"[{i}] has unknown role {role!r} (use system, user, assistant or tool)')
        content = msg.get("content", msg.get("value"))
        has_tool_calls = bool(msg.get("tool_calls"))
        if content is None and not has_tool_calls:
            raise BadRow(f'"{key}"[{i}] ({canon}) has no "content"')
        new: Message = {k: v for k, v in msg.items() if v is not None and k not in ("from", "value")}
        new["role"] = canon
        new["content"] = "" if content is None else _text(content, f"{key}[{i}].content")
        out.append(new)
    return out


def _check_roles(messages: list[Message], key: str) -> None:
    """ms-swift's order: optional system first, then user/assistant alternating (tools after calls)."""
    prev = None
    for i, msg in enumerate(messages):
        role = msg["role"]
        where = f'"{key}"[{i}]'
        if role == "system":
            if i != 0:
                raise BadRow(f"{where}: a system message is only allowed first")
        elif role == "user":
            if prev == "user":
                raise BadRow(f"{where}: two user messages in a row; turns must alternate user/assistant")
            if prev == "tool":
                raise BadRow(f"{where}: a user message after a tool result; an assistant reply must come first")
        elif role == "assistant":
            if prev in (None, "system"):
                raise BadRow(f"{where}: the conversation starts with an assistant message; a user turn must come first")
            if prev == "assistant":
                raise BadRow(f"{where}: two assistant messages in a row; turns must alternate user/assistant")
        elif role == "tool":
            if prev not in ("assistant", "tool"):
                raise BadRow(f"{where}: a tool message must follow an assistant tool call")
        prev = role
    if prev is None or all(m["role"] == "system" for m in messages):
        raise BadRow(f'"{key}" has no user turn')


def _check_ends_with_reply(messages: list[Message], key: str, name: str, kind: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise BadRow(f'"{key}" must end with an assistant reply ({name} rows need {_NEEDS[kind]})')
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip() and not msg.get("tool_calls"):
            raise BadRow(f'"{key}"[{i}]: empty assistant response')


def _rejected(data: dict[str, Any], chosen: list[Message], name: str) -> list[Message]:
    if data.get("rejected_messages") is not None:
        rejected = _parse_messages(data["rejected_messages"], "rejected_messages")
        _check_roles(rejected, "rejected_messages")
        _check_ends_with_reply(rejected, "rejected_messages", name, "pair")
        if rejected == chosen:
            raise BadRow('"rejected_messages" equals "messages"; the rejected reply must differ')
        return rejected
    key = "rejected_response" if data.get("rejected_response") is not None else (
        "rejected" if data.get("rejected") is not None and data.get("messages") is None else None)
    if key is None:
        raise BadRow(f'missing "rejected_response" ({name} rows need {_NEEDS["pair"]})')
    value = data[key]
    last_user = max(i for i, m in enumerate(chosen) if m["role"] == "user")
    if isinstance(value, (list, tuple)):
        tail = _parse_messages(value, key)
    else:
        tail = [{"role": "assistant", "content": _text(value, key)}]
    rejected = chosen[: last_user + 1] + tail
    _check_roles(rejected, key)
    if rejected[-1]["role"] != "assistant" or not rejected[-1]["content"].strip():
        raise BadRow(f'empty "{key}"; give the rejected assistant reply')
    if rejected == chosen:
        raise BadRow(f'"{key}" equals the chosen response; the rejected reply must differ')
    return rejected


def _margin(data: dict[str, Any]) -> float | None:
    value = data.get("margin")
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadRow(f'"margin" must be a number, got {value!r}')
    if not math.isfinite(float(value)):
        raise BadRow(f'"margin" must be finite, got {value!r}')
    return float(value)


def _text(value: Any, key: str) -> str:
    """Content as a string: numbers (e.g. from CSV) become text, text blocks are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        raise BadRow(f'"{key}" must be text, got {value!r}')
    if isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(b, dict) and b.get("type") == "text" for b in value):
        return "".join(str(b.get("text", "")) for b in value)
    raise BadRow(f'"{key}" must be text, got {type(value).__name__}')


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())
