"""The one table between Hugging Face tensor names and jaxalign parameter paths.

Import and export both read :func:`weight_table`, so the two directions cannot drift apart.
Each entry says which Hugging Face tensor feeds which parameter path and whether the
matrix is transposed (Hugging Face stores linear weights as [out, in], we store [in, out]).
The decoder's layers are stacked (scanned), so a per-layer tensor ``model.layers.N.…`` is entry
``layer=N`` of a parameter whose leading axis is the layer.
"""

from __future__ import annotations

import dataclasses
import re

from jaxalign.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    hf_name: str
    path: tuple[str | int, ...]
    transpose: bool
    layer: int | None = None  # the index on the stacked parameter's leading (layers) axis


# Tensors some checkpoints carry that hold no learned weight (recomputed at run time).
IGNORED_HF_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def weight_table(c: ModelConfig) -> list[WeightEntry]:
    """Every parameter of a decoder with config ``c``, paired with its Hugging Face name."""
    t: list[WeightEntry] = [WeightEntry("model.embed_tokens.weight", ("embed_tokens",), False)]
    for i in range(c.num_hidden_layers):
        hf, ours = f"model.layers.{i}", ("layers",)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t.append(WeightEntry(f"{hf}.self_attn.{proj}.weight", (*ours, "self_attn", proj, "kernel"), True, i))
            if (c.o_proj_bias if proj == "o_proj" else c.attention_bias):
                t.append(WeightEntry(f"{hf}.self_attn.{proj}.bias", (*ours, "self_attn", proj, "bias"), False, i))
        if c.qk_norm:
            for norm in ("q_norm", "k_norm"):
                t.append(WeightEntry(f"{hf}.self_attn.{norm}.weight", (*ours, "self_attn", norm, "scale"), False, i))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            t.append(WeightEntry(f"{hf}.mlp.{proj}.weight", (*ours, "mlp", proj, "kernel"), True, i))
            if c.mlp_bias:
                t.append(WeightEntry(f"{hf}.mlp.{proj}.bias", (*ours, "mlp", proj, "bias"), False, i))
        norms = ("input_layernorm", "post_attention_layernorm")
        if c.sandwich_norms:  # Gemma 2/3; the stored weights are Gemma's w of (1 + w), mapped as they are
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        for norm in norms:
            t.append(WeightEntry(f"{hf}.{norm}.weight", (*ours, norm, "scale"), False, i))
    t.append(WeightEntry("model.norm.weight", ("norm", "scale"), False))
    if not c.tie_word_embeddings:
        t.append(WeightEntry("lm_head.weight", ("lm_head",), True))
    return t


def tolerated_extra(name: str, c: ModelConfig) -> bool:
    """Whether an unmapped tensor in a checkpoint is harmless (a tied head copy, cached RoPE)."""
    if IGNORED_HF_TENSORS.match(name):
        return True
    return c.tie_word_embeddings and name == "lm_head.weight"
