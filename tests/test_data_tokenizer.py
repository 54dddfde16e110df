import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import IM_END, IM_START, PAD, chatml, ids  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from jaxalign.demo.tiny_tokenizer import build_char_tokenizer  # noqa: E402


def test_vocab_order_is_fixed():
    tok = build_char_tokenizer()
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|unk|>")] == [0, 1, 2, 3, 4]
    assert vocab["0"] == 5 and vocab["9"] == 14 and vocab["a"] == 15 and vocab["z"] == 40
    assert vocab[" "] == 41 and vocab["+"] == 42 and vocab["="] == 45 and vocab["\n"] == 57
    assert len(tok) == 69
    assert build_char_tokenizer().get_vocab() == vocab


def test_special_tokens_and_char_level_encoding():
    tok = build_char_tokenizer()
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", PAD)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", IM_END)
    assert tok("12+3=", add_special_tokens=False)["input_ids"] == [6, 7, 42, 8, 45]
    assert tok("ab<|im_end|>", add_special_tokens=False)["input_ids"] == [15, 16, 2]
    assert tok("A", add_special_tokens=False)["input_ids"] == [4]  # not in the vocab
    assert tok.decode([6, 7, 42, 8, 45, 2]) == "12+3=<|im_end|>"
    assert tok.decode([6, 41, 7, 2], skip_special_tokens=True) == "1 2"


def test_custom_chars():
    tok = build_char_tokenizer("xyx")
    assert tok("yx", add_special_tokens=False)["input_ids"] == [6, 5]
    assert len(tok) == 7


def test_chatml_template():
    tok = build_char_tokenizer()
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    gen = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gen == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == chatml(("system", "s"), ("user", "1+2="), ("assistant", "3"))
    assert chatml(("user", "1"))[:2] == [IM_START, ids("u")[0]]


def test_save_and_load_round_trip(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n<think>1+2</think><answer>3</answer><|im_end|>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.eos_token_id) == (PAD, IM_END)
    assert loaded.get_vocab() == tok.get_vocab()
