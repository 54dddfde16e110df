"""The decoder's configuration, built from (and written back to) a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# MLP activations (HF names): act(gate(x)) * up(x). "gelu_pytorch_tanh" is GELU's tanh approximation (Gemma's
# GeGLU), "gelu" the exact one.
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; one instance describes Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 or
    Gemma 3 (text)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 with attention_bias)
    o_proj_bias: bool = False  # bias on o_proj (Llama/Qwen3 with attention_bias; never Qwen2 or Mistral)
    mlp_bias: bool = False  # bias on gate/up/down (Llama with mlp_bias)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None
    # Per-layer "full_attention" / "sliding_attention" (Qwen2/Qwen3 layer_types); None: every
    # layer uses ``sliding_window`` (Mistral).
    layer_types: tuple[str, ...] | None = None
    hidden_act: str = "silu"  # one of SUPPORTED_ACTIVATIONS
    # Gemma: embeddings times sqrt(hidden_size) (cast to the compute dtype); RMSNorm scales by (1 + w), in
    # float32 before the cast back.
    embed_scale: bool = False
    norm_plus_one: bool = False
    # Gemma 2/3: norms around the attention and the MLP outputs too ("sandwich"): post_attention_layernorm
    # normalises the attention output (not the MLP input, as in Llama), pre_/post_feedforward_layernorm
    # the MLP's input and output.
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar**-0.5 (else head_dim)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) before masking
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    # Gemma 3: the RoPE base of sliding-window layers (default RoPE, no scaling); the rope_* fields above are
    # then the global (full-attention) layers'. None: every layer uses the rope_* fields.
    rope_local_theta: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf_config: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    generation_config: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of layer ``layer`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        """The factor on q.k before the softmax."""
        return float((self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5)

    def layer_uses_local_rope(self, layer: int) -> bool:
        """Whether layer ``layer`` rotates with ``rope_local_theta`` (a Gemma 3 sliding-window layer)."""
        return (self.rope_local_theta is not None and self.layer_types is not None
                and self.layer_types[layer] == "sliding_attention")

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json to write next to exported weights."""
        if self.hf_config is not None:
            out = dict(self.hf_config)
        else:
            out = _fresh_hf_dict(self)
        out["architectures"] = [_HF_ARCHITECTURES[self.model_type]]
        out["model_type"] = self.model_type
        out["tie_word_embeddings"] = self.tie_word_embeddings
        out["torch_dtype"] = "float32"
        out.pop("dtype", None)
        out["dtype"] = "float32"
        return out


def _fresh_hf_dict(c: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type == "llama3":
        rope.update(
            factor=c.rope_factor,
            low_freq_factor=c.rope_low_freq_factor,
            high_freq_factor=c.rope_high_freq_factor,
            original_max_position_embeddings=c.rope_original_max_position,
        )
    elif c.rope_type == "linear":
        rope.update(factor=c.rope_factor)
    d: dict[str, Any] = dict(
        model_type=c.model_type,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        hidden_act=c.hidden_act,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        rope_theta=c.rope_theta,
        rope_scaling=None if c.rope_type == "default" else rope,
        rope_parameters=rope,
    )
    if c.model_type == "llama":
        d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if c.model_type == "qwen3":
        d.update(attention_bias=c.attention_bias)
    if c.model_type == "mistral":
        d.update(sliding_window=c.sliding_window)
    if c.model_type in ("qwen2", "qwen3"):
        d.update(sliding_window=c.sliding_window, use_sliding_window=c.sliding_window is not None)
        layer_types = c.layer_types or tuple(
            "sliding_attention" if c.sliding_window is not None else "full_attention" for _ in range(c.num_hidden_layers)
        )
        d.update(layer_types=list(layer_types), max_window_layers=c.num_hidden_layers)
    if c.model_type in GEMMA_MODEL_TYPES:
        d.update(attention_bias=c.attention_bias)
    if c.model_type in ("gemma2", "gemma3_text"):
        scalar = c.query_pre_attn_scalar
        d.update(hidden_activation=c.hidden_act,
                 query_pre_attn_scalar=int(scalar) if scalar is not None and float(scalar).is_integer() else scalar,
                 attn_logit_softcapping=c.attn_logit_softcapping, final_logit_softcapping=c.final_logit_softcapping,
                 sliding_window=c.sliding_window,
                 layer_types=list(c.layer_types or ("full_attention",) * c.num_hidden_layers))
    if c.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta}
        d.update(rope_parameters={"full_attention": rope, "sliding_attention": local}, rope_scaling=None)
        d.pop("rope_theta")
    return d


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face config dict; refuse what we cannot run."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; jaxalign runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} ({', '.join(_HF_ARCHITECTURES[t] for t in SUPPORTED_MODEL_TYPES)})"
        )
    gemma = model_type in GEMMA_MODEL_TYPES
    # Gemma 2/3 name the activation hidden_activation; Gemma's legacy "gelu" means the tanh approximation
    # (transformers' GemmaConfig rewrites it so).
    act = d.get("hidden_activation") if model_type in ("gemma2", "gemma3_text") else None
    act = act or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"
    if act not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"{source}: hidden activation {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    if gemma and d.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention is not supported; jaxalign runs causal LMs")
    try:
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        layers = int(d["num_hidden_layers"])
        rope = _rope_from_hf(d, model_type, source)
        sliding, layer_types = _sliding_from_hf(d, model_type, layers, source)
        # Which projections carry a bias, as each Hugging Face family builds its nn.Linear layers.
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type in ("llama", "qwen3") or gemma:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        else:  # mistral: no biases at all
            qkv_bias = o_bias = False
        sandwich = model_type in ("gemma2", "gemma3_text")
        softcap = lambda key: float(d[key]) if sandwich and d.get(key) is not None else None
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sliding_window=sliding,
            layer_types=layer_types,
            hidden_act=act,
            embed_scale=gemma,
            norm_plus_one=gemma,
            sandwich_norms=sandwich,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)) if sandwich else None,
            attn_logit_softcapping=softcap("attn_logit_softcapping"),
            final_logit_softcapping=softcap("final_logit_softcapping"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hf_config=dict(d),
            **rope,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: required key {e.args[0]!r} is missing; is this a causal LM config.json?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: invalid value ({e}); restore the model's original config.json") from None


def _sliding_from_hf(d: dict[str, Any], model_type: str, layers: int, source: str):
    """(window, per-layer types) the way transformers decides which layers use sliding-window attention."""
    if model_type == "mistral":
        window = d.get("sliding_window")
        return (int(window) if window else None), None
    if model_type in ("gemma2", "gemma3_text"):
        # transformers fills layer_types in (Gemma 2: every other layer slides, from layer 0; Gemma 3: five
        # sliding then one global); they are kept even without a window (they pick Gemma 3's RoPE base).
        types = d.get("layer_types")
        if types is None:
            pattern = 2 if model_type == "gemma2" else int(d.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        types = _check_layer_types(types, layers, source)
        window = d.get("sliding_window")
        return (int(window) if window and "sliding_attention" in types else None), types
    if model_type not in ("qwen2", "qwen3") or not d.get("use_sliding_window") or not d.get("sliding_window"):
        return None, None
    window = int(d["sliding_window"])
    types = d.get("layer_types")
    if types is None:
        first = int(d.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    types = _check_layer_types(types, layers, source)
    if "sliding_attention" not in types:
        return None, None
    return window, types


def _check_layer_types(types, layers: int, source: str) -> tuple[str, ...]:
    types = tuple(types)
    if len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise CheckpointError(
            f"{source}: layer_types must list 'full_attention' or 'sliding_attention' for each of the {layers} layers"
        )
    return types


def _rope_from_hf(d: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    if model_type == "gemma3_text":
        return _gemma3_rope_from_hf(d, source)
    return _one_rope_from_hf(d, d.get("rope_parameters") or {}, d.get("rope_scaling") or {}, source)


def _gemma3_rope_from_hf(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Gemma 3: ``rope_parameters`` per layer type (transformers 5), or the older flat form — ``rope_theta``
    (+ ``rope_scaling``) for global layers and ``rope_local_base_freq`` for sliding ones."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**(d.get("rope_scaling") or {}), **params}
        local = {}
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    if (local.get("rope_type") or local.get("type") or "default") != "default":
        raise CheckpointError(f"{source}: a scaled RoPE on sliding-window layers is not supported "
                              f"(rope_parameters.sliding_attention: {local})")
    out = _one_rope_from_hf(d, full, {}, source)
    out["rope_local_theta"] = float(local["rope_theta"])
    return out


def _one_rope_from_hf(d: dict[str, Any], params: dict[str, Any], scaling: dict[str, Any], source: str) -> dict[str, Any]:
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(_SUPPORTED_ROPE_TYPES)}"
        )
    out: dict[str, Any] = {"rope_theta": theta, "rope_type": rope_type}
    if rope_type in ("llama3", "linear"):
        out["rope_factor"] = float(merged.get("factor", 1.0))
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(merged.get("low_freq_factor", 1.0))
        out["rope_high_freq_factor"] = float(merged.get("high_freq_factor", 4.0))
        out["rope_original_max_position"] = int(merged.get("original_max_position_embeddings", 8192))
    return out
