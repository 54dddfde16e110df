"""`jaxalign demo` and what it is built from: a synthetic addition task with a checkable answer
(``synthetic``), a character tokenizer (``tiny_tokenizer``), a tiny random Llama (``tiny_model``),
held-out evaluation (``evaluation``), the staged pipeline (``pipeline``) and its picture (``figure``).
Tests and benchmarks use the same pieces."""

from jaxalign.demo.pipeline import carry_slips, run_demo, stage_options
from jaxalign.demo.synthetic import (
    make_addition_rows,
    make_kto_rows,
    make_preference_rows,
    make_prompt_rows,
    make_style_pairs,
)
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.demo.tiny_tokenizer import build_char_tokenizer

__all__ = ["build_char_tokenizer", "carry_slips", "llama_config", "make_addition_rows", "make_kto_rows",
           "make_preference_rows", "make_prompt_rows", "make_style_pairs", "random_model", "run_demo", "stage_options"]
