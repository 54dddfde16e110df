import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import write_jsonl  # noqa: E402

from jaxalign.data import load_dataset_rows, normalize_rows, task_kind  # noqa: E402
from jaxalign.data.rows import Row  # noqa: E402
from jaxalign.errors import ConfigError, DataError, JaxalignError  # noqa: E402

U = {"role": "user", "content": "1+1="}
A = {"role": "assistant", "content": "2"}
S = {"role": "system", "content": "be brief"}


def one(row, task):
    examples, bad = normalize_rows([Row(row, "d.jsonl", 1, is_jsonl=True)], task)
    assert bad == 0
    return examples[0]


def error_of(row, task, where="d.jsonl line 1"):
    with pytest.raises(DataError) as e:
        normalize_rows([Row(row, "d.jsonl", 1, is_jsonl=True)], task)
    msg = str(e.value)
    assert isinstance(e.value, JaxalignError) and "\n" not in msg
    assert msg.startswith(where + ": ") and msg.endswith("; fix the row or pass --ignore_bad_rows")
    return msg[len(where) + 2 : -len("; fix the row or pass --ignore_bad_rows")]


def test_task_kinds():
    assert [task_kind(t) for t in ("sft", "dpo", "cpo", "orpo", "simpo", "rm", "kto", "grpo", "ppo")] == [
        "sft", "pair", "pair", "pair", "pair", "pair", "kto", "prompt", "prompt"]
    with pytest.raises(ConfigError, match="unknown task 'gkd'"):
        task_kind("gkd")


def test_messages_row():
    ex = one({"messages": [S, U, A], "solution": "2"}, "sft")
    assert ex.messages == [S, U, A] and ex.extras == {"solution": "2"} and ex.where == "d.jsonl line 1"


def test_query_response_history_system():
    ex = one({"system": "be brief", "query": "q2", "response": "r2", "history": [["q1", "r1"]]}, "sft")
    assert ex.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"},
    ]
    assert ex.extras == {}
    csv_like = one({"query": "1+1=", "response": 2, "system": None, "history": None}, "sft")
    assert csv_like.messages == [U, A]
    alpaca = one({"instruction": "add", "input": "1+1", "output": "2"}, "sft")
    assert alpaca.messages == [{"role": "user", "content": "add\n1+1"}, A]
    numina = one({"problem": "1+1=", "solution": "2"}, "sft")
    assert numina.messages == [U, A] and numina.extras == {"solution": "2"}


def test_sharegpt_conversation_columns():
    pairs = one({"system": "be brief", "conversation": [{"human": "q1", "assistant": "r1"},
                                                        {"human": "1+1=", "assistant": "2"}]}, "sft")
    assert pairs.messages == [S, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"}, U, A]
    assert pairs.extras == {}
    turns = one({"conversations": [{"from": "human", "value": "1+1="}, {"from": "gpt", "value": "2"}]}, "sft")
    assert turns.messages == [U, A]
    prompt = one({"conversation": [{"human": "1+1="}], "solution": "2"}, "grpo")
    assert prompt.messages == [U] and prompt.extras == {"solution": "2"}
    pair = one({"conversation": [{"human": "1+1=", "assistant": "2"}], "rejected_response": "3"}, "dpo")
    assert pair.messages == [U, A] and pair.rejected_messages == [U, {"role": "assistant", "content": "3"}]


def test_tools_column_as_list_or_json_text():
    tools = [{"type": "function", "function": {"name": "add"}}]
    assert one({"messages": [U, A], "tools": tools}, "sft").tools == tools
    assert one({"messages": [U, A], "tools": '[{"type": "function", "function": {"name": "add"}}]'}, "sft").tools == tools
    assert one({"messages": [U], "tools": tools, "solution": "2"}, "grpo").tools == tools
    assert one({"messages": [U, A], "tools": "", "rejected_response": "3"}, "dpo").tools is None
    assert error_of({"messages": [U, A], "tools": "[{"}, "sft").startswith('"tools" is not valid JSON (')
    assert error_of({"messages": [U, A], "tools": ["add"]}, "sft") == (
        '"tools" must be a list of function definitions (objects), or its JSON text')


def test_ms_swift_column_auto_mapping():
    for response_key in ("targets", "target", "answer_key", "answers", "text", "content"):
        assert one({"question": "1+1=", response_key: "2"}, "sft").messages == [U, A]
    assert one({"input": "1+1=", "output": "2"}, "sft").messages == [U, A]
    assert one({"messages": [U, A], "images": [], "videos": None}, "sft").messages == [U, A]  # empty media: none


def test_sharegpt_roles_and_text_blocks():
    ex = one({"messages": [{"from": "human", "value": "1+1="},
                           {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]}, "sft")
    assert ex.messages == [U, A]


def test_tool_turns():
    msgs = [U, {"role": "tool_call", "content": '{"name": "add"}'}, {"role": "tool_response", "content": "2"}, A]
    ex = one({"messages": msgs}, "sft")
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool", "assistant"]


def test_arrow_null_fields_are_dropped():
    ex = one({"messages": [dict(U, tool_calls=None), dict(A, name=None)]}, "sft")
    assert ex.messages == [U, A]


@pytest.mark.parametrize(
    "row,task,expected",
    [
        ({"prompt_text": "x"}, "sft",
         'missing "messages" (SFT rows need "messages" ending with an assistant reply (or "query"/"response" columns))'),
        ({"messages": None}, "dpo",
         'missing "messages" (DPO rows need "messages" plus "rejected_response" or "rejected_messages")'),
        ({"messages": "hi"}, "sft", '"messages" must be a non-empty list of {"role": ..., "content": ...} objects'),
        ({"messages": []}, "sft", '"messages" must be a non-empty list of {"role": ..., "content": ...} objects'),
        ({"messages": [U, "x"]}, "sft", '"messages"[1] must be an object with "role" and "content"'),
        ({"messages": [{"content": "x"}, A]}, "sft", '"messages"[0] has no "role"'),
        ({"messages": [{"role": "bot", "content": "x"}]}, "sft",
         '"messages"[0] has unknown role \'bot\' (use system, user, assistant or tool)'),
        ({"messages": [{"role": "user"}, A]}, "sft", '"messages"[0] (user) has no "content"'),
        ({"messages": [{"role": "user", "content": 3.5j}, A]}, "sft", '"messages[0].content" must be text, got complex'),
        ({"messages": [A, U, A]}, "sft",
         '"messages"[0]: the conversation starts with an assistant message; a user turn must come first'),
        ({"messages": [S, A]}, "sft",
         '"messages"[1]: the conversation starts with an assistant message; a user turn must come first'),
        ({"messages": [U, S, A]}, "sft", '"messages"[1]: a system message is only allowed first'),
        ({"messages": [U, U, A]}, "sft", '"messages"[1]: two user messages in a row; turns must alternate user/assistant'),
        ({"messages": [U, A, A]}, "sft",
         '"messages"[2]: two assistant messages in a row; turns must alternate user/assistant'),
        ({"messages": [U, {"role": "tool", "content": "x"}]}, "sft",
         '"messages"[1]: a tool message must follow an assistant tool call'),
        ({"messages": [S]}, "sft", '"messages" has no user turn'),
        ({"messages": [U]}, "sft",
         '"messages" must end with an assistant reply (SFT rows need "messages" ending with an assistant reply '
         '(or "query"/"response" columns))'),
        ({"messages": [U, {"role": "assistant", "content": "  "}]}, "sft", '"messages"[1]: empty assistant response'),
        ({"messages": [U, {"role": "assistant", "content": ""}, U, A]}, "sft", '"messages"[1]: empty assistant response'),
        ({"messages": [U, A]}, "dpo",
         'missing "rejected_response" (DPO rows need "messages" plus "rejected_response" or "rejected_messages")'),
        ({"messages": [U, A], "rejected_response": ""}, "dpo", 'empty "rejected_response"; give the rejected assistant reply'),
        ({"messages": [U, A], "rejected_response": "2"}, "rm",
         '"rejected_response" equals the chosen response; the rejected reply must differ'),
        ({"messages": [U, A], "rejected_messages": [U, A]}, "orpo",
         '"rejected_messages" equals "messages"; the rejected reply must differ'),
        ({"messages": [U, A], "rejected_messages": [U]}, "cpo",
         '"rejected_messages" must end with an assistant reply (CPO rows need "messages" plus "rejected_response" '
         'or "rejected_messages")'),
        ({"messages": [U, A], "rejected_response": "3", "margin": "big"}, "rm", '"margin" must be a number, got \'big\''),
        ({"messages": [U, A], "rejected_response": "3", "margin": True}, "rm", '"margin" must be a number, got True'),
        ({"messages": [U, A], "rejected_response": "3", "margin": float("nan")}, "rm", '"margin" must be finite, got nan'),
        ({"messages": [U, A]}, "kto",
         'missing "label" (KTO rows need "messages" ending with an assistant reply plus a boolean "label")'),
        ({"messages": [U, A], "label": 1}, "kto", '"label" must be true or false, got 1'),
        ({"messages": [U, A], "label": "true"}, "kto", '"label" must be true or false, got \'true\''),
        ({"messages": [A]}, "grpo", '"messages" has no user turn'),
        ({"messages": [S]}, "ppo", '"messages" has no user turn'),
        ({"messages": [U, A, {"role": "tool", "content": "x"}]}, "grpo",
         '"messages" must end with a user turn (GRPO rows need "messages" ending with a user turn (or a "query" column))'),
        ({"history": [["a"]], "query": "q", "response": "r"}, "sft", '"history"[0] must be a [query, response] pair'),
        ({"history": "x", "query": "q", "response": "r"}, "sft", '"history" must be a list of [query, response] pairs'),
        ({"messages": [U, A], "images": ["cat.png"]}, "sft",
         '"images": multimodal rows are not supported (jaxalign trains text-only models); drop the column or the row'),
        ({"messages": [U, A], "rejected_response": "3", "rejected_images": ["dog.png"]}, "dpo",
         '"rejected_images": multimodal rows are not supported (jaxalign trains text-only models); drop the column or '
         'the row'),
        ({"conversation": [{"human": "a"}, {"human": "b", "assistant": "c"}]}, "sft",
         '"conversation"[0] has no "assistant" reply (only the last pair may lack one)'),
        ({"conversation": [{"assistant": "a"}]}, "sft", '"conversation"[0] has no "human" turn'),
        ({"conversation": "hi"}, "sft", '"conversation" must be a non-empty list of {"human": ..., "assistant": ...} objects'),
    ],
)
def test_malformed_rows(row, task, expected):
    assert error_of(row, task) == expected


def test_error_names_file_and_line_from_disk(tmp_path):
    good = {"messages": [U, A], "rejected_response": "3"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good] * 6 + [{"messages": [U, A]}])
    rows = load_dataset_rows(path)
    with pytest.raises(DataError) as e:
        normalize_rows(rows, "dpo")
    assert str(e.value) == (
        f'{path} line 7: missing "rejected_response" (DPO rows need "messages" plus "rejected_response" or '
        '"rejected_messages"); fix the row or pass --ignore_bad_rows'
    )


def test_ignore_bad_rows_counts_and_skips(tmp_path):
    rows = [
        {"messages": [U, A], "label": True},
        "{broken",
        {"messages": [U, A], "label": "yes"},
        {"messages": [U, U, A], "label": False},
        {"query": "q", "response": "r", "label": False},
        {"messages": [U, {"role": "assistant", "content": ""}], "label": True},
    ]
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    loaded = load_dataset_rows(path, ignore_bad_rows=True)
    examples, bad = normalize_rows(loaded, "kto", ignore_bad_rows=True)
    assert bad == 4
    assert [ex.where for ex in examples] == [f"{path} line 1", f"{path} line 5"]
    assert [ex.label for ex in examples] == [True, False]
    with pytest.raises(DataError, match=r"k\.jsonl line 2: bad JSON"):
        normalize_rows(loaded, "kto")


def test_preference_rows():
    ex = one({"messages": [S, U, A], "rejected_response": "3", "margin": 0.5}, "rm")
    assert ex.messages == [S, U, A]
    assert ex.rejected_messages == [S, U, {"role": "assistant", "content": "3"}]
    assert ex.margin == 0.5 and ex.extras == {}
    multi = [U, A, {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "4"}]
    ex = one({"messages": multi, "rejected_response": "5"}, "dpo")
    assert ex.rejected_messages == multi[:3] + [{"role": "assistant", "content": "5"}] and ex.margin is None
    ex = one({"messages": [U, A], "rejected_messages": [S, U, {"role": "assistant", "content": "3"}]}, "dpo")
    assert ex.rejected_messages[0] == S
    ex = one({"messages": [U, A], "rejected_response": [{"role": "assistant", "content": "3"}]}, "dpo")
    assert ex.rejected_messages == [U, {"role": "assistant", "content": "3"}]
    trl = one({"prompt": "1+1=", "chosen": "2", "rejected": "3"}, "dpo")
    assert trl.messages == [U, A] and trl.rejected_messages == [U, {"role": "assistant", "content": "3"}]
    assert one({"messages": [U, A], "rejected_response": "3", "margin": np.int64(2)}, "rm").margin == 2.0


def test_kto_rows():
    ex = one({"messages": [U, A], "label": np.bool_(False), "source": "x"}, "kto")
    assert ex.label is False and ex.extras == {"source": "x"}
    assert one({"prompt": "1+1=", "completion": "2", "label": True}, "kto").messages == [U, A]


def test_prompt_rows_carry_extras_and_drop_final_answer():
    ex = one({"messages": [S, U, A], "solution": "2", "level": 3}, "grpo")
    assert ex.messages == [S, U] and ex.extras == {"solution": "2", "level": 3}
    ex = one({"problem": "1+1=", "solution": "2"}, "grpo")
    assert ex.messages == [U] and ex.extras == {"solution": "2"}
    ex = one({"query": "1+1=", "response": "2"}, "ppo")
    assert ex.messages == [U] and ex.extras == {"response": "2"}
