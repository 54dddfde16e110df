"""A tiny character-level tokenizer with a ChatML chat template, built offline.

Used by the tests and by `jaxalign demo`: every character is one token, so expected token
ids and loss masks can be worked out by hand.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"

# Order fixes the ids: the special tokens take 0..4, then the characters in this order.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, ENDOFTEXT, UNK_TOKEN)

DEFAULT_CHARS: str = (
    string.digits + string.ascii_lowercase + " " + "+-*=<>/(),.:?!'\n" + '"_;[]{}#%&|'
)

CHATML_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_char_tokenizer(chars: str | None = None) -> "PreTrainedTokenizerFast":
    """Build a character-level tokenizer: one id per character plus ChatML special tokens.

    Ids: ``<|pad|>``=0, ``<|im_start|>``=1, ``<|im_end|>``=2, ``<|endoftext|>``=3,
    ``<|unk|>``=4, then each distinct character of ``chars`` (default :data:`DEFAULT_CHARS`)
    in order. ``eos_token`` is ``<|im_end|>`` and the chat template is ChatML.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = DEFAULT_CHARS if chars is None else chars
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch not in vocab:
            vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, ENDOFTEXT],
        model_max_length=1 << 20,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok
