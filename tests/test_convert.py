"""Hugging Face -> jaxalign -> Hugging Face: bit-identical tensors, same logits, sharded files, tokenizer,
and atomic, refusing writes."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from helpers import assert_state_dicts_identical, tiny_tokenizer, FAMILIES, make_hf_model, save_hf_model_dir
from jaxalign.convert import load_hf_model, save_hf_model, weight_table
from jaxalign.errors import CheckpointError, JaxalignError
from jaxalign.models import config_from_hf

IDS = torch.tensor([[5, 17, 42, 8, 66, 23, 91, 3]])
SHARD = "20KB"  # the tiny models hold ~40-90 KB of float32 weights: several shards


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (transformers model, its save_pretrained folder, jaxalign model loaded from it)."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"src_{family}")
            hf = save_hf_model_dir(family, folder)
            cache[family] = (hf, folder, load_hf_model(folder))
        return cache[family]

    return get


def from_pretrained(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_params_equal_hf(model, hf_state_dict):
    """Every jaxalign parameter equals its Hugging Face tensor exactly (transposed for linear weights)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = weight_table(model.config)
    assert {e.path for e in table} == set(flat)  # no parameter left out of the table
    layers = model.config.num_hidden_layers
    assert len(table) == sum(layers if p[0] == "layers" else 1 for p in flat)  # every layer of a stacked one
    for e in table:
        ours = np.asarray(flat[e.path][...])
        if e.layer is not None:
            ours = ours[e.layer]
        assert ours.dtype == np.float32, e.hf_name
        theirs = hf_state_dict[e.hf_name].float().numpy()
        np.testing.assert_array_equal(ours, theirs.T if e.transpose else theirs, err_msg=e.hf_name)


def config_without_path(folder):
    d = transformers.AutoConfig.from_pretrained(str(folder)).to_dict()
    d.pop("_name_or_path", None)
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_identical(sources, family, tmp_path):
    hf, src, model = sources(family)
    assert_params_equal_hf(model, hf.state_dict())

    out = save_hf_model(model, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    back = from_pretrained(out)
    assert_state_dicts_identical(hf.state_dict(), back.state_dict())
    assert torch.equal(hf_logits(back), hf_logits(hf))
    assert config_without_path(out) == config_without_path(src)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    assert type(back).__name__ == type(hf).__name__


FRESH_CASES = {
    **{name: (name, {}) for name in FAMILIES},
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2_mixed_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}


@pytest.mark.parametrize("case", list(FRESH_CASES))
def test_config_written_from_scratch_loads_in_transformers(case, tmp_path):
    """Models made in jaxalign (no original config.json to copy) export a config.json transformers reads the same."""
    family, overrides = FRESH_CASES[case]
    hf = save_hf_model_dir(family, tmp_path / "src", seed=5, initializer_range=0.2, **overrides)
    model = load_hf_model(tmp_path / "src")
    fresh = dataclasses.replace(model.config, hf_config=None, generation_config=None)
    model.config = fresh
    assert config_from_hf(fresh.to_hf_dict()) == fresh
    out = save_hf_model(model, tmp_path / "out")
    back = from_pretrained(out)
    assert_state_dicts_identical(hf.state_dict(), back.state_dict())
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_sharded_save_is_read_back_by_both(sources, tmp_path):
    hf, _, model = sources("llama")
    out = save_hf_model(model, tmp_path / "out", max_shard_size=SHARD)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(hf.state_dict())
    total = sum(v.numel() * 4 for v in hf.state_dict().values())
    assert index["metadata"]["total_size"] == total
    for s in shards:  # no shard holds more than max_shard_size of tensor data (none is bigger alone)
        names = [k for k, v in index["weight_map"].items() if v == s]
        assert sum(hf.state_dict()[k].numel() * 4 for k in names) <= 20_000

    back = from_pretrained(out)
    assert_state_dicts_identical(hf.state_dict(), back.state_dict())
    assert torch.equal(hf_logits(back), hf_logits(hf))
    assert_params_equal_hf(load_hf_model(out), hf.state_dict())


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied
def test_reads_checkpoints_sharded_by_transformers(family, tmp_path):
    hf = make_hf_model(family, seed=3)
    hf.save_pretrained(str(tmp_path), max_shard_size=SHARD)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2
    assert_params_equal_hf(load_hf_model(tmp_path), hf.state_dict())


def test_reads_bfloat16_checkpoint(tmp_path):
    hf16 = make_hf_model("qwen3", seed=4).to(torch.bfloat16)
    hf16.save_pretrained(str(tmp_path))
    assert_params_equal_hf(load_hf_model(tmp_path), hf16.state_dict())  # bf16 widened to float32 exactly


def test_tokenizer_is_saved(sources, tmp_path):
    _, _, model = sources("llama")
    tok = tiny_tokenizer()
    dst = tmp_path / "out"
    dst.mkdir()  # an existing empty folder is fine
    save_hf_model(model, dst, tokenizer=tok)
    assert (dst / "tokenizer.json").is_file() and (dst / "tokenizer_config.json").is_file()
    back = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert back("hello the cat sat")["input_ids"] == tok("hello the cat sat")["input_ids"] == [4, 6, 7, 8]
    assert (back.pad_token, back.bos_token, back.eos_token) == ("<pad>", "<s>", "</s>")
    msgs = [{"role": "user", "content": "hello world"}]
    assert back.apply_chat_template(msgs, tokenize=False) == "user hello world </s> "
    from_pretrained(dst)  # the model files are there too


def test_refuses_folder_that_holds_a_model(sources, tmp_path):
    _, _, model = sources("llama")
    dst = save_hf_model(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(CheckpointError, match="already holds a model"):
        save_hf_model(model, dst, tokenizer=tiny_tokenizer())
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert list(tmp_path.glob(".out.tmp-*")) == []


class BrokenTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{")
        raise OSError("No space left on device")


def test_failure_leaves_nothing_behind(sources, tmp_path):
    _, _, model = sources("llama")
    with pytest.raises(OSError, match="No space left"):
        save_hf_model(model, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the staging folder .out.tmp-*


def test_load_errors_are_jaxalign_errors(sources, tmp_path):
    _, src, _ = sources("llama")
    with pytest.raises(JaxalignError, match="no such model folder"):
        load_hf_model(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = "many"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JaxalignError, match="config.json"):
        load_hf_model(bad)



def test_config_in_transformers_4_layout():
    """Older config.json files keep rope_theta at the top level and the scaling in rope_scaling."""
    old = dict(
        model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, torch_dtype="bfloat16",
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    )
    c = config_from_hf(old)
    assert (c.rope_type, c.rope_theta, c.rope_factor, c.rope_original_max_position) == ("llama3", 500000.0, 32.0, 8192)
    assert (c.head_dim, c.attention_bias, c.o_proj_bias, c.sliding_window) == (8, False, False, None)
    linear = config_from_hf({**old, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (linear.rope_type, linear.rope_factor) == ("linear", 4.0)
    with pytest.raises(CheckpointError, match="'dynamic'"):
        config_from_hf({**old, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    qwen = config_from_hf({**old, "model_type": "qwen2", "rope_scaling": None, "use_sliding_window": True,
                           "sliding_window": 16, "max_window_layers": 1})
    assert (qwen.attention_bias, qwen.o_proj_bias) == (True, False)
    assert [qwen.layer_sliding_window(i) for i in range(2)] == [None, 16]
