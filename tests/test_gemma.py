"""Gemma, Gemma 2 and Gemma 3 (text) through the one decoder (issue 20).

The shared test models (helpers.FAMILIES: gemma, gemma2, gemma3) already run through the parity (left and right
padding, bfloat16), HF round-trip, fresh-config and greedy-generation tests; here: each Gemma feature really
moves transformers' logits and we follow it, prefill + decode over stacked and per-layer caches past the sliding
window, the chat template and <end_of_turn> stop id, and one DPO and one GRPO step whose numbers come from
transformers' logits.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import (
    BASE, FAMILIES, SHARP, assert_merged_equals_peft, cached_forward, config, forward, hf_row_logits, make_hf_model,
    max_diff_real, padded_batch, per_completion_rows, rewrite_config, write_jsonl,
)
from jaxalign.convert import load_hf_model
from jaxalign.data.template import ChatRenderer
from jaxalign.data.tokenizer import load_tokenizer, stop_token_ids
from jaxalign.demo import build_char_tokenizer, make_prompt_rows
from jaxalign.demo.tiny_tokenizer import ENDOFTEXT, IM_START
from jaxalign.errors import CheckpointError
from jaxalign.models import init_cache
from jaxalign.models.config import config_from_hf
from jaxalign.models.kv_cache import unstack
from jaxalign.trainers.run import build_trainer

GEMMAS = ("gemma", "gemma2", "gemma3")
TOL = 1e-4
LENGTHS, WIDTH = (12, 9, 4), 12  # left-padded, longer than the sliding window (4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (transformers model, folder), built once."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            hf = make_hf_model(family, **SHARP)
            hf.save_pretrained(str(folder), safe_serialization=True)
            cache[family] = (hf, folder)
        return cache[family]

    return get


def hf_from(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# ----- each Gemma switch matters, and we follow it -------------------------------------------------------
# (family, config change): transformers' logits move by far more than TOL, and jaxalign's stay within TOL.
SWITCHES = {
    "gemma2_no_final_softcap": ("gemma2", dict(final_logit_softcapping=None)),
    "gemma2_no_attn_softcap": ("gemma2", dict(attn_logit_softcapping=None)),
    "gemma2_query_pre_attn_scalar": ("gemma2", dict(query_pre_attn_scalar=16)),
    "gemma2_all_global": ("gemma2", dict(layer_types=["full_attention", "full_attention"])),
    "gemma3_local_rope_base": ("gemma3", dict(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}})),
    "gemma3_global_rope_scaling": ("gemma3", dict(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    "gemma_legacy_gelu_is_tanh": ("gemma", dict(hidden_act="gelu")),  # exact gelu: HF reads it as tanh
}


@pytest.mark.parametrize("case", list(SWITCHES))
def test_each_switch_moves_transformers_and_we_follow(folders, case, tmp_path):
    family, change = SWITCHES[case]
    hf, folder = folders(family)
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    rewrite_config(changed, **change)
    hf2 = hf_from(changed)
    ids, mask = padded_batch(LENGTHS, WIDTH, "left")
    ref, ref2 = hf_row_logits(hf, ids, mask), hf_row_logits(hf2, ids, mask)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(ref, ref2))
    if case == "gemma_legacy_gelu_is_tanh":
        # Gemma's legacy "gelu" means the tanh approximation in transformers: nothing moves, for us neither.
        assert moved == 0.0
    else:
        assert moved > 100 * TOL, moved
    for f, r in ((folder, ref), (changed, ref2)):
        model = load_hf_model(f)
        assert max_diff_real(forward(model, jnp.asarray(ids), jnp.asarray(mask)), r, mask) <= TOL


def test_config_switches_read_from_transformers_configs(folders):
    c2 = load_hf_model(folders("gemma2")[1]).config
    assert (c2.attn_logit_softcapping, c2.final_logit_softcapping, c2.query_pre_attn_scalar) == (5.0, 3.0, 24.0)
    assert c2.layer_types == ("sliding_attention", "full_attention") and c2.sliding_window == 4
    assert c2.sandwich_norms and c2.norm_plus_one and c2.embed_scale and c2.tie_word_embeddings
    assert c2.hidden_act == "gelu_pytorch_tanh" and c2.rope_local_theta is None
    c3 = load_hf_model(folders("gemma3")[1]).config
    assert c3.qk_norm and c3.rope_local_theta == 10.0 and c3.rope_theta == 1000.0
    assert (c3.rope_type, c3.rope_factor) == ("linear", 2.0)
    assert c3.attn_logit_softcapping is None and c3.final_logit_softcapping is None
    c1 = load_hf_model(folders("gemma")[1]).config
    assert c1.head_dim == 16 and c1.hidden_size // c1.num_attention_heads == 8
    assert not c1.sandwich_norms and c1.sliding_window is None and c1.query_pre_attn_scalar is None


def test_older_gemma3_config_with_rope_local_base_freq():
    """Gemma 3 configs written before per-layer-type rope_parameters: rope_theta + rope_scaling for global layers,
    rope_local_base_freq for sliding ones."""
    d = dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=6,
             num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=512,
             rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    c = config_from_hf(d)
    assert (c.rope_theta, c.rope_local_theta, c.rope_type, c.rope_factor) == (1e6, 1e4, "linear", 8.0)
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)  # transformers' default pattern of 6


def test_unsupported_model_still_names_what_is_supported():
    with pytest.raises(CheckpointError) as e:
        config_from_hf({"model_type": "gpt2"})
    msg = str(e.value)
    for name in ("llama", "qwen3", "gemma", "gemma2", "gemma3_text", "GemmaForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM"):
        assert name in msg
    with pytest.raises(CheckpointError, match="use_bidirectional_attention"):
        config_from_hf(dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, use_bidirectional_attention=True))


# ----- prefill + decode ---------------------------------------------------------------------------------------
PROMPT_LENGTHS, PROMPT_WIDTH, STEPS, MAX_LEN = (7, 4, 2), 7, 5, 16


@pytest.mark.parametrize("family", GEMMAS)
def test_prefill_then_decode_equals_full_forward(folders, family):
    """Decoding runs past the window (4) of the sliding layers; the stacked cache (layer scan) and the per-layer
    one (layers unrolled, as the sampler decodes) both equal one full forward, which equals transformers'."""
    hf, folder = folders(family)
    model = load_hf_model(folder)
    vocab = model.config.vocab_size
    prompt, prompt_mask = padded_batch(PROMPT_LENGTHS, PROMPT_WIDTH, "left", vocab=vocab)
    new = np.random.RandomState(1).randint(3, vocab, size=(len(PROMPT_LENGTHS), STEPS)).astype(np.int32)
    ids = np.concatenate([prompt, new], 1)
    mask = np.concatenate([prompt_mask, np.ones_like(new)], 1)
    full = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_diff_real(full, hf_row_logits(hf, ids, mask), mask) <= TOL

    # The cached passes sum in another order than the full forward: float32 rounding, 2e-6 of the largest logit
    # (Gemma 3's reach 15 here: ~30 ulps, where 1e-5 is 10 and jax 0.12 measured 1.03e-5), never under 1e-5.
    tol = max(1e-5, 2e-6 * float(np.abs(full[mask.astype(bool)]).max()))
    cache = init_cache(model.config, len(PROMPT_LENGTHS), MAX_LEN)
    logits, cache = cached_forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache)
    real = prompt_mask.astype(bool)
    assert float(np.abs(np.asarray(logits)[real] - full[:, :PROMPT_WIDTH][real]).max()) <= tol
    for c in (cache, unstack(cache)):
        for i in range(STEPS):
            tok = jnp.asarray(new[:, i : i + 1])
            step_logits, c = cached_forward(model, tok, jnp.ones_like(tok), c)
            assert float(np.abs(np.asarray(step_logits[:, 0]) - full[:, PROMPT_WIDTH + i]).max()) <= tol, i


# ----- chat template and stop ids -------------------------------------------------------------------------
START, END = "<start_of_turn>", "<end_of_turn>"


def gemma_char_tokenizer():
    """The char tokenizer without a chat template, with Gemma's turn tokens added (ids 69 and 70)."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IM_START, ENDOFTEXT, START, END]})
    tok.chat_template = None
    return tok


def gemma_dir(path, family="gemma2", seed=0, tok=None):
    """A Gemma folder over the tokenizer's vocabulary, the tokenizer saved beside it."""
    tok = tok or gemma_char_tokenizer()
    hf = make_hf_model(family, seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=None, max_position_embeddings=512, **SHARP)
    hf.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return hf


def test_gemma_template_is_chosen_for_gemma_models():
    tok = gemma_char_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2"}]
    want = (f"{START}user\nbe brief\n\n1+1{END}\n{START}model\n2{END}\n{START}user\n2+2{END}\n{START}model\n")
    for renderer in (ChatRenderer(tok, None, model_type="gemma2"), ChatRenderer(tok, "gemma")):
        assert renderer.uses_gemma and renderer.render(msgs, add_generation_prompt=True) == want
    assert ChatRenderer(tok, None, model_type="llama").uses_plain  # other families keep the plain fallback
    ids = ChatRenderer(tok, "gemma").encode_text(want)
    assert ids.count(tok.convert_tokens_to_ids(END)) == 3 and ids.count(tok.convert_tokens_to_ids(START)) == 4


def test_end_of_turn_is_a_stop_token_of_gemma_models(tmp_path):
    gemma_dir(tmp_path / "g")
    tok, model = load_tokenizer(tmp_path / "g", training=False), load_hf_model(tmp_path / "g")
    end = tok.convert_tokens_to_ids(END)
    assert end == 70 and stop_token_ids(tok, model.config) == (tok.eos_token_id, end)
    # a Llama with the same tokenizer does not stop there
    llama_like = type(model.config)(**{**model.config.__dict__, "model_type": "llama"})
    assert stop_token_ids(tok, llama_like) == (tok.eos_token_id,)


# ----- training steps on Gemma 2 (soft caps, sliding layer), numbers from transformers -------------------
def hf_logps(hf, ids, attn):
    """log p(ids[r, t] | real tokens before) [B, T] from transformers, each row run alone without its padding
    (real tokens contiguous); 0 where nothing is predicted."""
    out = np.zeros(ids.shape, np.float64)
    with torch.no_grad():
        for r in range(ids.shape[0]):
            real = np.flatnonzero(attn[r])
            logits = hf(input_ids=torch.tensor(ids[r, real][None], dtype=torch.long)).logits[0].double()
            lsm = torch.log_softmax(logits, -1).numpy()
            for j in range(1, len(real)):
                out[r, real[j]] = lsm[j - 1, ids[r, real[j]]]
    return out


def logsig(x):
    return -np.logaddexp(0.0, -x)


def test_one_dpo_step_matches_transformers(tmp_path):
    tok = gemma_char_tokenizer()
    policy = gemma_dir(tmp_path / "policy", seed=0, tok=tok)
    ref = gemma_dir(tmp_path / "ref", seed=1, tok=tok)
    rows = [{"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "yes"}],
             "rejected_response": "no"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = config(tmp_path / "policy", data, tmp_path / "out", rlhf_type="dpo", ref_model=str(tmp_path / "ref"),
                 beta=0.1, rpo_alpha=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                 max_length=32, length_buckets="32", learning_rate=1e-3, save_hf=False)
    tr = build_trainer(cfg, quiet=True)
    batch = tr.algo.next_step_batch(tr)
    ids = np.asarray(batch["chosen_input_ids"][0])
    text = tok.decode(ids[0][np.asarray(batch["chosen_attention_mask"][0][0]) > 0])
    assert text.startswith(f"{START}user\nq") and text.endswith(f"{START}model\nyes{END}")  # Gemma turns chosen
    m = {k: float(v) for k, v in jax.device_get(tr.train_step(batch)).items()}
    sums = {}
    for name, model in (("pol", policy), ("ref", ref)):
        for side in ("chosen", "rejected"):
            parts = []
            for a in range(batch[f"{side}_input_ids"].shape[0]):
                i, at, lm = (np.asarray(batch[f"{side}_{k}"][a]) for k in ("input_ids", "attention_mask", "loss_mask"))
                parts.append((hf_logps(model, i, at) * lm).sum(1))
            sums[name, side] = np.concatenate(parts)
    z = (sums["pol", "chosen"] - sums["ref", "chosen"]) - (sums["pol", "rejected"] - sums["ref", "rejected"])
    assert m["loss"] == pytest.approx(float(np.mean(-logsig(0.1 * z))), rel=1e-4, abs=1e-5)
    assert m["logps/chosen"] == pytest.approx(float(sums["pol", "chosen"].mean()), rel=1e-4, abs=1e-4)
    assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    m2 = {k: float(v) for k, v in jax.device_get(tr.train_step(tr.algo.next_step_batch(tr))).items()}
    assert np.isfinite(m2["loss"])


def charsum(completions, **kwargs):
    """A reward that differs between completions of one prompt (non-zero advantages)."""
    return [(sum(map(ord, c)) % 7) / 6.0 for c in completions]


@pytest.fixture
def charsum_reward():
    import jaxalign.rewards

    jaxalign.rewards.register("test_gemma_charsum")(charsum)
    yield "test_gemma_charsum"
    jaxalign.rewards.unregister("test_gemma_charsum")


def test_one_grpo_step_matches_transformers(tmp_path, charsum_reward):
    """The rollout (sampler over the per-layer cache, soft-capped logits) records transformers' log-probs of what it
    sampled, with <end_of_turn> among its stop ids, and the first update's loss is GRPO's formula on transformers'
    numbers."""
    tok = gemma_char_tokenizer()
    hf = gemma_dir(tmp_path / "policy", seed=2, tok=tok)
    data = write_jsonl(tmp_path / "prompts.jsonl", make_prompt_rows(8, seed=5, digits=(1, 2)))
    g, c, temp, beta, eps = 4, 6, 0.9, 0.1, 0.2
    cfg = config(tmp_path / "policy", data, tmp_path / "out", rlhf_type="grpo", reward_funcs=charsum_reward,
                 num_generations=g, max_completion_length=c, temperature=temp, beta=beta, epsilon=eps,
                 per_device_train_batch_size=2 * g, gradient_accumulation_steps=1, max_length=32,
                 length_buckets="16,32", learning_rate=1e-2, max_steps=2, save_hf=False)
    tr = build_trainer(cfg, quiet=True)
    end = tok.convert_tokens_to_ids(END)
    assert end in tr.algo.stop_ids
    arrays, metrics, samples = tr.algo.generation_batch_arrays(tr, next(tr.batches))
    assert tr.algo.pack == g  # trained with each prompt once, its completions after it
    flat = per_completion_rows(arrays)
    ids, attn, cmask = (np.asarray(flat[k]) for k in ("input_ids", "attention_mask", "completion_mask"))
    p = ids.shape[1] - c
    assert tok.decode(ids[0, :p][attn[0, :p] > 0]).endswith(f"{START}model\n")
    # the rollout's log-probs are at the sampling temperature: recompute them from transformers' logits
    with torch.no_grad():
        lp = np.zeros((ids.shape[0], c))
        for r in range(ids.shape[0]):
            real = np.flatnonzero(attn[r])
            logits = hf(input_ids=torch.tensor(ids[r, real][None], dtype=torch.long)).logits[0].double() / temp
            lsm = torch.log_softmax(logits, -1).numpy()
            for j in range(c):
                if cmask[r, j]:
                    pos = np.searchsorted(real, p + j)
                    lp[r, j] = lsm[pos - 1, ids[r, p + j]]
    assert np.abs((lp - np.asarray(arrays["old_logps"])) * cmask).max() < 1e-4
    assert cmask.sum() > 0
    # a completion shorter than the limit ended on a stop id
    for r in range(ids.shape[0]):
        n = int(cmask[r].sum())
        if n < c:
            assert ids[r, p + n - 1] in tr.algo.stop_ids
    # first update (policy == reference: KL 0) on old log-probs perturbed so that ratios spread past both clip
    # bounds: GRPO's clipped surrogate, per-row token mean averaged over rows, on transformers' log-probs
    noise = np.random.default_rng(0).normal(0.0, 0.3, lp.shape)
    old = (lp + noise) * cmask
    got = {k: float(v) for k, v in jax.device_get(tr.train_step(
        _stacked(tr, {**arrays, "old_logps": old.astype(np.float32)}))).items()}
    ratio = np.exp(lp - old)
    a = np.asarray(arrays["advantages"], np.float64)[:, None]
    assert np.abs(a).max() > 0.5
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    want = np.mean((per_token * cmask).sum(1) / np.maximum(cmask.sum(1), 1))
    assert got["loss"] == pytest.approx(float(want), rel=2e-4, abs=2e-6)
    assert got["kl"] == pytest.approx(0.0, abs=1e-6) and got["grad_norm"] > 0


def _stacked(trainer, arrays):
    from jaxalign.data.batching import stack_micro_batches

    return stack_micro_batches(trainer.algo.micro_batches(trainer, arrays), trainer.pad_id)


# ----- LoRA on every linear layer, PEFT both ways, merged export -----------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_all_linear_lora_equals_peft_and_merged_export(folders, family, tmp_path):
    """A jaxalign all-linear adapter on a Gemma model loads in PEFT with the same logits, and the merged export
    (`jaxalign export --merge_lora`) equals PEFT's merge_and_unload."""
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file

    from jaxalign.cli import main
    from jaxalign.convert.peft_io import save_adapter
    from jaxalign.models.lora import LoRASettings, add_lora, parse_target_modules

    _, folder = folders(family)
    model = load_hf_model(folder)
    settings = LoRASettings(rank=4, alpha=8.0, target_modules=parse_target_modules("all-linear"),
                            dropout=0.0, init_lora_weights=False)
    add_lora(model, settings, seed=3)
    save_adapter(model, tmp_path / "adapter", settings=settings, base_model=str(folder))
    ids, mask = padded_batch(LENGTHS, WIDTH, "right")
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert len(keys) == 2 * 7 * 2  # 2 layers x 7 linear modules x (A, B)
    peft_model = peft.PeftModel.from_pretrained(hf_from(folder), str(tmp_path / "adapter")).eval()
    theirs = hf_row_logits(peft_model, ids, mask)
    base = hf_row_logits(hf_from(folder), ids, mask)
    assert max(float(np.abs(a - b).max()) for a, b in zip(theirs, base)) > 1e-2  # the adapter matters
    assert max_diff_real(ours, theirs, mask) <= TOL

    out = tmp_path / "merged"
    assert main(["export", "--adapters", str(tmp_path / "adapter"), "--model", str(folder), "--merge_lora", "true",
                 "--output_dir", str(out)]) == 0
    assert_merged_equals_peft(out, peft_model)
    assert json.loads((out / "config.json").read_text())["model_type"] == hf_from(folder).config.model_type


# ----- reward models: *ForSequenceClassification both ways ----------------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_seq_cls_reward_model_scores_equal_transformers(family, tmp_path):
    """transformers' Gemma*ForSequenceClassification read as a reward model scores as transformers does (its
    score head sees the final norm's output; no final soft-cap applies), and converts back to the same layout."""
    from jaxalign.convert import load_reward_model
    from jaxalign.convert.seq_cls import convert_reward_model, load_seq_cls_reward_model

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**BASE, **extra, **SHARP, "num_labels": 1})
    torch.manual_seed(4)
    hf = transformers.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(str(tmp_path / "rm"), safe_serialization=True)
    ids, mask = padded_batch((9, 5), 9, "right")
    ids = np.where(mask > 0, ids, 0).astype(np.int32)  # transformers finds the last token by the pad id (0)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0]
    np.testing.assert_allclose(np.asarray(load_seq_cls_reward_model(tmp_path / "rm").scores(ids, mask)),
                               theirs.numpy(), atol=1e-4)
    convert_reward_model(tmp_path / "rm", tmp_path / "vh")
    np.testing.assert_allclose(np.asarray(load_reward_model(tmp_path / "vh").scores(ids, mask)), theirs.numpy(),
                               atol=1e-4)
    convert_reward_model(tmp_path / "vh", tmp_path / "back")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "back"),
                                                                           dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        again = back(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0]
    np.testing.assert_allclose(again.numpy(), theirs.numpy(), atol=1e-6)


# ----- infer: Gemma's turns by default, stopping at <end_of_turn> ---------------------------------------------
def test_infer_renders_gemma_turns_and_stops_at_end_of_turn(tmp_path, capsys):
    """The tokenizer has no chat template, so infer renders Gemma's turns; greedy decoding equals transformers'
    generate with <eos> and <end_of_turn> as stop ids, and (for this seed) stops on <end_of_turn>."""
    from jaxalign.cli import main

    tok = gemma_char_tokenizer()
    hf = gemma_dir(tmp_path / "g", family="gemma2", seed=30, tok=tok)
    end = tok.convert_tokens_to_ids(END)
    text = f"{START}user\nhi{END}\n{START}model\n"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                          pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id, end])[0, ids.shape[1]:].tolist()
    assert ref[-1] == end and len(ref) < 8  # this seed's model ends its turn early
    assert main(["infer", "--model", str(tmp_path / "g"), "--prompt", "hi", "--max_new_tokens", "8"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prompt"] == text
    assert row["response_token_ids"] == ref and row["finish_reason"] == "stop"


# ----- gradients: remat and the chunked attention's backward through the soft cap, in the whole model --------
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gradients_equal_across_remat_and_attention_impls(folders, family):
    """The parameter gradient of a weighted sum of the logits is the same with the layers rematerialised and with
    ``chunked`` attention in small tiles (its custom backward, through Gemma 2's attention soft cap) as with plain
    ``xla`` attention and no remat."""
    from flax import nnx

    from jaxalign.models import attention
    from jaxalign.models.decoder import set_attn_impl, set_remat

    ids, mask = padded_batch(LENGTHS, WIDTH, "left")
    weight = np.random.default_rng(0).normal(size=(len(LENGTHS), WIDTH, 1)).astype(np.float32) * mask[..., None]

    def grads(impl, remat):
        model = load_hf_model(folders(family)[1])
        set_attn_impl(model, impl)
        set_remat(model, remat)
        graphdef, state = nnx.split(model)
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(jnp.asarray(ids), jnp.asarray(mask)) * weight)  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss))(state))

    old = (attention.BLOCK_Q, attention.BLOCK_K)
    attention.BLOCK_Q, attention.BLOCK_K = 4, 8  # several tiles, some skipped by the window
    try:
        got = grads("chunked", True)
    finally:
        attention.BLOCK_Q, attention.BLOCK_K = old
    want = grads("xla", False)
    assert max(float(np.abs(np.asarray(w)).max()) for w in want) > 1e-2
    for a, b in zip(got, want):
        # Each leaf's float32 rounding scales with its largest gradient (Gemma 3's embedding gradient reaches 263,
        # where plain remat alone moves elements by 3e-4): 1e-5 of that, where a wrong backward moves whole percents.
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=max(1e-4, 1e-5 * scale))


# ----- on a mesh ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sharded_forward_equals_transformers(family, tmp_path):
    """Loaded onto a data=2, fsdp=2, tensor=2 mesh of the 8 simulated devices (every dimension splits), the
    logits of a left-padded batch equal transformers'."""
    from helpers import SHARDABLE
    from jaxalign.parallel import batch_sharding, make_mesh

    hf = make_hf_model(family, **SHARP, **SHARDABLE)
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    mesh = make_mesh("data=2,fsdp=2,tensor=2", devices=jax.devices()[:8])
    model = load_hf_model(tmp_path, mesh=mesh)
    assert len(model.layers.pre_feedforward_layernorm.scale[...].sharding.device_set) == 8
    ids, mask = padded_batch((10, 7, 3, 10, 1, 5, 8, 2), 10, "left", vocab=128)
    batch = batch_sharding(mesh)
    logits = forward(model, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch))
    assert max_diff_real(np.asarray(logits), hf_row_logits(hf, ids, mask), mask) <= TOL
