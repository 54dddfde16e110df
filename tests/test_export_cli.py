"""`jaxalign export`: a working export, and bad input refused with exit code 2, one line on stderr and
no output folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from helpers import assert_state_dicts_identical, rewrite_config, tiny_tokenizer, save_hf_model_dir
from jaxalign.cli import main


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama folder with a tokenizer, as a user would download it."""
    folder = tmp_path_factory.mktemp("src")
    hf = save_hf_model_dir("llama", folder)
    tiny_tokenizer().save_pretrained(str(folder))
    return hf, folder


@pytest.fixture
def broken(source, tmp_path):
    """A private copy of the source folder for a test to damage."""
    dst = tmp_path / "model"
    shutil.copytree(source[1], dst)
    return dst


def run_export(capsys, src, dst, *extra):
    capsys.readouterr()  # drop anything printed before the command
    code = main(["export", "--model", str(src), "--output_dir", str(dst), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, src, tmp_path, *words):
    dst = tmp_path / "exported"
    code, out, err = run_export(capsys, src, dst)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("jaxalign: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert out == ""
    assert not dst.exists()
    assert list(tmp_path.glob(".exported.tmp-*")) == []
    return lines[0]


def test_export_writes_a_loadable_folder(source, tmp_path, capsys):
    hf, src = source
    dst = tmp_path / "exported"
    code, out, err = run_export(capsys, src, dst, "--max_shard_size", "30KB")
    assert code == 0, err
    assert str(dst) in out
    assert (dst / "model.safetensors.index.json").is_file()
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32)
    assert_state_dicts_identical(hf.state_dict(), back.state_dict())
    tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert tok("hello world")["input_ids"] == [4, 5]
    # A second export into the same folder is refused and leaves the first intact.
    code, out, err = run_export(capsys, src, dst)
    assert code == 2 and "already holds a model" in err and len(err.strip().splitlines()) == 1
    assert (dst / "model.safetensors.index.json").is_file()


def test_missing_folder(capsys, tmp_path):
    assert_refused(capsys, tmp_path / "no_such_model", tmp_path, "no_such_model", "no such model folder")


def test_no_config_json(broken, capsys, tmp_path):
    (broken / "config.json").unlink()
    assert_refused(capsys, broken, tmp_path, "no config.json", str(broken))


def test_unsupported_model_type(broken, capsys, tmp_path):
    rewrite_config(broken, model_type="gpt2")
    line = assert_refused(capsys, broken, tmp_path, "config.json", "'gpt2'", "not supported")
    assert "llama" in line and "qwen2" in line  # says what is supported


def test_truncated_safetensors(broken, capsys, tmp_path):
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_refused(capsys, broken, tmp_path, "model.safetensors", "truncated")


def rewrite_weights(folder, change):
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})


def test_tensor_of_wrong_shape(broken, capsys, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"  # [16, 32]: 2 kv heads x 8

    def change(t):
        t[name] = t[name][:8].copy()

    rewrite_weights(broken, change)
    assert_refused(capsys, broken, tmp_path, name, "[8, 32]", "[16, 32]", "model.safetensors")


def test_missing_tensor(broken, capsys, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_weights(broken, lambda t: t.pop(name))
    assert_refused(capsys, broken, tmp_path, name, "missing")


def test_unexpected_tensor(broken, capsys, tmp_path):
    name = "model.layers.0.self_attn.o_proj.bias"

    def change(t):
        t[name] = t["model.norm.weight"].copy()

    rewrite_weights(broken, change)
    assert_refused(capsys, broken, tmp_path, name, "unexpected")


def test_index_naming_a_missing_shard(source, capsys, tmp_path):
    hf, _ = source
    folder = tmp_path / "sharded"
    hf.save_pretrained(str(folder), max_shard_size="30KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert_refused(capsys, folder, tmp_path, shards[-1].name, "missing")


def test_unreadable_config_json(broken, capsys, tmp_path):
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"})[:-3])
    assert_refused(capsys, broken, tmp_path, "config.json", "not valid JSON")
