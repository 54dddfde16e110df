import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import ENDOFTEXT, IM_END, IM_START, chatml, ids, tokenizer  # noqa: E402

from jaxalign.data import Encoder, EncodeStats, Example  # noqa: E402
from jaxalign.demo import build_char_tokenizer  # noqa: E402
from jaxalign.errors import ConfigError, DataError  # noqa: E402

U = {"role": "user", "content": "1+2="}
A = {"role": "assistant", "content": "3"}
S = {"role": "system", "content": "add"}


def sft(messages, **kw):
    return Encoder(tokenizer(), kind="sft", **kw).encode(Example(messages, "t.jsonl line 1"))


def test_one_turn_ids_and_mask_by_hand():
    ex = sft([U, A])
    # <|im_start|> u s e r \n 1 + 2 = <|im_end|> \n <|im_start|> a s s i s t a n t \n 3 <|im_end|>
    expected = [1, 35, 33, 19, 32, 57, 6, 42, 7, 45, 2, 57, 1, 15, 33, 33, 23, 33, 34, 15, 28, 34, 57, 8, 2]
    assert ex.input_ids.tolist() == expected
    assert ex.input_ids.dtype == np.int32
    assert ex.loss_mask.tolist() == [0] * 23 + [1, 1]  # "3" and <|im_end|>, not the trailing newline
    assert ex.where == "t.jsonl line 1"


def test_multi_turn_loss_scales():
    u2, a2 = {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}
    msgs = [S, U, A, u2, a2]
    expected_ids = chatml(("system", "add"), ("user", "1+2="), ("assistant", "3"), ("user", "2+2="), ("assistant", "4"))[:-1]
    n = len(expected_ids)
    first_reply = len(chatml(("system", "add"), ("user", "1+2="))) + len(ids("<|im_start|>", "assistant\n"))

    last = sft(msgs)
    assert last.input_ids.tolist() == expected_ids
    assert np.flatnonzero(last.loss_mask).tolist() == [n - 2, n - 1]

    every = sft(msgs, loss_scale="default")
    assert every.input_ids.tolist() == expected_ids
    assert np.flatnonzero(every.loss_mask).tolist() == [first_reply, first_reply + 1, n - 2, n - 1]
    assert every.input_ids[first_reply : first_reply + 2].tolist() == ids("3", IM_END)
    assert every.input_ids[first_reply + 2] == ids("\n")[0]  # the newline after <|im_end|> is prompt

    everything = sft(msgs, loss_scale="all")
    assert everything.loss_mask.tolist() == [0] + [1] * (n - 1)


def test_plain_template_and_fallback():
    expected = ids("system: add\nuser: 1+2=\nassistant: 3", IM_END)
    ex = sft([S, U, A], template="plain")
    assert ex.input_ids.tolist() == expected
    assert ex.loss_mask.tolist() == [0] * (len(expected) - 2) + [1, 1]

    bare = build_char_tokenizer()
    bare.chat_template = None
    bare.bos_token = "<|endoftext|>"
    ex = Encoder(bare).encode(Example([U, A], "w"))
    assert ex.input_ids.tolist() == [ENDOFTEXT] + ids("user: 1+2=\nassistant: 3", IM_END)
    with pytest.raises(ConfigError, match=r"--template 'qwen': choose 'default'"):
        Encoder(tokenizer(), template="qwen")


def test_other_template_shapes():
    tok = build_char_tokenizer()
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = (  # Llama-3-like: BOS, blank line after the header, no newline between turns
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
    )
    ex = Encoder(tok, loss_scale="default").encode(Example([U, A, U, A], "w"))
    one = ids(IM_START, "user\n\n1+2=", IM_END, IM_START, "assistant\n\n3", IM_END)
    assert ex.input_ids.tolist() == [ENDOFTEXT] + one + one
    assert np.flatnonzero(ex.loss_mask).tolist() == [len(one) - 1, len(one), 2 * len(one) - 1, 2 * len(one)]


def test_template_rendering_last_reply_differently():
    tok = build_char_tokenizer()
    tok.chat_template = (  # Qwen3-like: replies after the last user turn get an empty think block
        "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.index0 > ns.last %}"
        "{{ '<|im_start|>assistant\n<think></think>' + m['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    ex = Encoder(tok, loss_scale="default").encode(Example([U, A, U, A], "w"))
    first = chatml(("user", "1+2="), ("assistant", "3"), ("user", "1+2="))
    last = ids(IM_START, "assistant\n<think></think>3", IM_END)
    assert ex.input_ids.tolist() == first + last
    reply1 = len(chatml(("user", "1+2="))) + len(ids(IM_START, "assistant\n"))
    n = len(first + last)
    assert np.flatnonzero(ex.loss_mask).tolist() == [reply1, reply1 + 1] + list(range(n - len(ids("<think></think>3")) - 1, n))


def test_template_that_refuses_names_row():
    tok = build_char_tokenizer()
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(DataError, match=r"^t\.jsonl line 4: the chat template refused this conversation "
                                        r"\(Conversation roles must alternate\); fix the row or pass --template plain$"):
        Encoder(tok).encode(Example([U, A], "t.jsonl line 4"))


def test_last_prompt_matches_generation_prompt():
    enc = Encoder(tokenizer(), kind="sft")
    msgs = [S, U, A, {"role": "user", "content": "5+5="}, {"role": "assistant", "content": "10"}]
    seq, mask, prompt_len = enc.encode_conversation(msgs)
    assert seq[:prompt_len].tolist() == enc.encode_prompt(msgs[:-1]).tolist()
    assert seq[prompt_len:].tolist() == ids("10", IM_END)
    assert mask[prompt_len:].all() and not mask[:prompt_len].any()


def test_truncation_strategies():
    msgs = [U, {"role": "assistant", "content": "12345"}]
    full = sft(msgs)
    n = full.length  # 29
    stats = EncodeStats()
    enc = Encoder(tokenizer(), max_length=n - 1)
    assert enc.encode(Example(msgs, "w"), stats) is None and stats.deleted_too_long == 1
    assert enc.encode_all([Example(msgs, "w"), Example([U, A], "w")])[1].deleted_too_long == 1
    assert sft(msgs, max_length=n).input_ids.tolist() == full.input_ids.tolist()

    left = sft(msgs, max_length=10, truncation_strategy="left")
    assert left.input_ids.tolist() == full.input_ids[-10:].tolist()
    assert left.loss_mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]

    right = sft(msgs, max_length=n - 3, truncation_strategy="right")
    assert right.input_ids.tolist() == full.input_ids[: n - 3].tolist()
    assert right.loss_mask.tolist() == full.loss_mask[: n - 3].tolist() and right.loss_mask.sum() == 3

    stats = EncodeStats()
    gone = Encoder(tokenizer(), max_length=12, truncation_strategy="right").encode(Example(msgs, "w"), stats)
    assert gone is None and stats.no_loss_tokens == 1 and stats.dropped == 1
    with pytest.raises(ConfigError, match="--truncation_strategy 'middle': choose one of delete, left, right"):
        Encoder(tokenizer(), truncation_strategy="middle")
    with pytest.raises(ConfigError, match="--loss_scale 'some'"):
        Encoder(tokenizer(), loss_scale="some")


def test_pair_encoding():
    enc = Encoder(tokenizer(), kind="dpo")
    ex = enc.encode(Example([U, A], "w", rejected_messages=[U, {"role": "assistant", "content": "44"}], margin=1.5))
    prompt = chatml(("user", "1+2=")) + ids(IM_START, "assistant\n")
    assert ex.chosen_ids.tolist() == prompt + ids("3", IM_END)
    assert ex.rejected_ids.tolist() == prompt + ids("44", IM_END)
    assert ex.chosen_mask.tolist() == [0] * len(prompt) + [1, 1]
    assert ex.rejected_mask.tolist() == [0] * len(prompt) + [1, 1, 1]
    assert ex.margin == 1.5 and ex.length == len(prompt) + 3
    stats = EncodeStats()
    long_rej = Example([U, A], "w", rejected_messages=[U, {"role": "assistant", "content": "4444"}])
    assert Encoder(tokenizer(), kind="rm", max_length=len(prompt) + 3).encode(long_rej, stats) is None
    assert stats.deleted_too_long == 1


def test_kto_encoding_and_truncation():
    enc = Encoder(tokenizer(), kind="kto")
    ex = enc.encode(Example([S, U, A], "w", label=False))
    assert ex.prompt_ids.tolist() == chatml(("system", "add"), ("user", "1+2=")) + ids(IM_START, "assistant\n")
    assert ex.completion_ids.tolist() == ids("3", IM_END) and ex.label is False
    long = Example([U, {"role": "assistant", "content": "12345"}], "w", label=True)
    left = Encoder(tokenizer(), kind="kto", max_length=8, truncation_strategy="left").encode(long)
    assert left.prompt_ids.tolist() == ids("t\n") and left.completion_ids.tolist() == ids("12345", IM_END)
    tiny = Encoder(tokenizer(), kind="kto", max_length=5, truncation_strategy="left").encode(long)
    assert tiny.prompt_ids.tolist() == [] and tiny.completion_ids.tolist() == ids("2345", IM_END)
    right = Encoder(tokenizer(), kind="kto", max_length=25, truncation_strategy="right").encode(long)
    assert right.completion_ids.tolist() == ids("12") and right.length == 25
    assert Encoder(tokenizer(), kind="kto", max_length=25).encode(long) is None


def test_prompt_encoding():
    enc = Encoder(tokenizer(), kind="grpo")
    ex = enc.encode(Example([S, U], "w", extras={"solution": "3"}))
    expected = chatml(("system", "add"), ("user", "1+2=")) + ids(IM_START, "assistant\n")
    assert ex.prompt_ids.tolist() == expected and ex.extras == {"solution": "3"}
    assert ex.messages == [S, U]
    cut = Encoder(tokenizer(), kind="grpo", max_length=12).encode(Example([S, U], "w"))
    assert cut.prompt_ids.tolist() == expected[-12:]  # prompts default to left truncation
    stats = EncodeStats()
    assert Encoder(tokenizer(), kind="ppo", max_length=12, truncation_strategy="delete").encode(Example([U], "w"), stats) is None
    assert stats.deleted_too_long == 1
    with pytest.raises(ConfigError, match="choose one of delete, left for prompt-only"):
        Encoder(tokenizer(), kind="grpo", truncation_strategy="right")


def _tools_tokenizer():
    """The char tokenizer with a ChatML template that lists the tools' names in a system turn, as Qwen's does."""
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t['name'] }};{% endfor %}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def test_tools_rendered_into_the_prompt_and_not_trained():
    tools = [{"name": "add"}, {"name": "sub"}]
    tok = _tools_tokenizer()
    ex = Encoder(tok, kind="sft").encode(Example([U, A], "w", tools=tools))
    prompt = chatml(("system", "add;sub;"), ("user", "1+2=")) + ids(IM_START, "assistant\n")
    assert ex.input_ids.tolist() == prompt + ids("3", IM_END)  # the text after the last reply is not kept
    assert np.flatnonzero(ex.loss_mask).tolist() == [len(prompt), len(prompt) + 1]
    grpo = Encoder(tok, kind="grpo").encode(Example([U], "w", tools=tools))
    assert grpo.prompt_ids.tolist() == prompt
    pair = Encoder(tok, kind="dpo").encode(Example([U, A], "w", rejected_messages=[U, {"role": "assistant", "content": "4"}],
                                                   tools=tools))
    assert pair.rejected_ids.tolist() == prompt + ids("4", IM_END)


def test_tools_refused_by_a_template_that_ignores_them():
    with pytest.raises(DataError, match=r'^t\.jsonl line 2: the row has "tools" but the chat template does not render '
                                        r'them .*; use a model whose template takes tools, or drop the column$'):
        Encoder(tokenizer(), kind="sft").encode(Example([U, A], "t.jsonl line 2", tools=[{"name": "add"}]))


def test_template_that_moves_earlier_turns_is_refused_per_reply():
    """A template that puts the tools before the last user turn (as Mistral's do) renders the turns before an
    earlier reply differently once later turns follow: masking that reply alone would train user text."""
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if loop.index0 == ns.last and tools %}[tools:{% for t in tools %}{{ t['name'] }}"
        "{% endfor %}]{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tools = [{"name": "add"}]
    with pytest.raises(DataError, match=r"^w: the chat template renders the turns before assistant reply 1 differently "
                                        r"once later turns follow, .*; pass --loss_scale last_round$"):
        Encoder(tok, loss_scale="default").encode(Example([U, A, U, A], "w", tools=tools))
    last = Encoder(tok).encode(Example([U, A, U, A], "w", tools=tools))  # last_round: only the final reply
    prompt = chatml(("user", "1+2="), ("assistant", "3")) + ids("[tools:add]") + chatml(("user", "1+2=")) \
        + ids(IM_START, "assistant\n")
    assert last.input_ids.tolist() == prompt + ids("3", IM_END)
    assert np.flatnonzero(last.loss_mask).tolist() == [len(prompt), len(prompt) + 1]
