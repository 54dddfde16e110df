"""tools/: the conversion scripts end to end on tiny models — Hugging Face -> mesh-laid orbax checkpoint
-> Hugging Face bit-exact, and reward models between the value-head and sequence-classification layouts,
checked against transformers' own AutoModelForSequenceClassification."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jaxalign.cli import main
from jaxalign.convert import load_checkpoint_model, load_hf_model, load_reward_model, save_reward_model
from jaxalign.convert.seq_cls import load_seq_cls_reward_model
from jaxalign.models.value_head import RewardModel, ValueHead
from jaxalign.parallel import make_mesh

from helpers import BASE, short_rows, write_jsonl

TOOLS = Path(__file__).resolve().parents[1] / "tools"
IDS = np.array([[5, 9, 14, 20, 7, 3], [5, 9, 11, 0, 0, 0]], np.int32)
MASK = (np.arange(6)[None, :] < np.array([[6], [3]])).astype(np.int32)


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def value_head_rm(base, tmp_path_factory):
    """A value-head reward model with a non-zero bias."""
    backbone = load_hf_model(base)
    head = ValueHead(backbone.config.hidden_size, rngs=nnx.Rngs(5), std=0.5)
    head.summary.bias[...] = np.array([0.75], np.float32)
    path = tmp_path_factory.mktemp("rm") / "rm"
    save_reward_model(RewardModel(backbone, head), path, tokenizer=transformers.AutoTokenizer.from_pretrained(base))
    return path


def test_hf_to_checkpoint_and_back_is_bit_exact(base, tmp_path, capsys):
    ckpt_root = tmp_path / "ckpt"
    assert tool("convert_hf_to_jaxalign")(["--model", base, "--output_dir", str(ckpt_root),
                                           "--mesh", "data=1,fsdp=4,tensor=2"]) == 0
    ckpt = ckpt_root / "checkpoint-0"
    assert (ckpt_root / "tokenizer" / "tokenizer.json").is_file()
    # Saved laid out for fsdp=4 x tensor=2; read back onto another mesh, straight onto its shardings.
    mesh = make_mesh("data=1,fsdp=2,tensor=1", devices=jax.devices()[:2])
    model = load_checkpoint_model(ckpt, mesh=mesh)
    kernel = model.layers.mlp.up_proj.kernel[...]
    assert kernel.sharding.mesh.shape == mesh.shape and len(kernel.sharding.device_set) == 2
    assert tool("convert_jaxalign_to_hf")(["--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "hf")]) == 0
    before, after = load_file(f"{base}/model.safetensors"), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_training_starts_from_a_converted_checkpoint(base, tmp_path):
    assert tool("convert_hf_to_jaxalign")(["--model", base, "--output_dir", str(tmp_path / "ckpt")]) == 0
    data = write_jsonl(tmp_path / "d.jsonl", short_rows(8, seed=3))
    rc = main(["sft", "--model", str(tmp_path / "ckpt" / "checkpoint-0"), "--dataset", data, "--output_dir",
               str(tmp_path / "out"), "--max_steps", "1", "--max_length", "32", "--mesh", "data=1,fsdp=1,tensor=1"])
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_value_head_to_seq_cls_matches_transformers(value_head_rm, tmp_path, capsys):
    out = tmp_path / "seqcls"
    assert tool("convert_value_head")(["--input_dir", str(value_head_rm), "--output_dir", str(out)]) == 0
    said = capsys.readouterr().out
    assert "bias 0.75 is not carried" in said
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK)).logits[:, 0]
    ours = np.asarray(load_reward_model(value_head_rm).scores(IDS, MASK))
    np.testing.assert_allclose(theirs.numpy(), ours - 0.75, atol=1e-5)
    # ...and back: the same backbone and score weight, bias 0, the LM head tied to the embeddings.
    back = tmp_path / "vhead"
    assert tool("convert_value_head")(["--input_dir", str(out), "--output_dir", str(back)]) == 0
    heads = load_file(str(back / "value_head.safetensors"))
    np.testing.assert_array_equal(heads["v_head.summary.weight"], load_file(str(out / "model.safetensors"))["score.weight"])
    assert heads["v_head.summary.bias"].tolist() == [0.0]
    original = load_file(str(value_head_rm / "model.safetensors"))
    returned = load_file(str(back / "model.safetensors"))
    assert set(returned) == set(original) - {"lm_head.weight"}
    for name in returned:
        np.testing.assert_array_equal(returned[name], original[name])
    causal = transformers.AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32)
    assert causal.config.tie_word_embeddings


def test_transformers_seq_cls_model_converts(tmp_path, capsys):
    """A sequence-classification folder as TRL's RewardTrainer writes it (no bias, no LM head)."""
    cfg = transformers.LlamaConfig(**{**BASE, "num_labels": 1, "tie_word_embeddings": False})
    torch.manual_seed(7)
    hf = transformers.LlamaForSequenceClassification(cfg).eval()
    hf.save_pretrained(str(tmp_path / "trl_rm"), safe_serialization=True)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK)).logits[:, 0]
    np.testing.assert_allclose(np.asarray(load_seq_cls_reward_model(tmp_path / "trl_rm").scores(IDS, MASK)),
                               theirs.numpy(), atol=1e-5)
    assert tool("convert_value_head")(["--input_dir", str(tmp_path / "trl_rm"), "--output_dir", str(tmp_path / "vh")]) == 0
    np.testing.assert_allclose(np.asarray(load_reward_model(tmp_path / "vh").scores(IDS, MASK)), theirs.numpy(), atol=1e-5)


def test_tool_errors_are_one_line(base, value_head_rm, tmp_path, capsys):
    cases = [
        ("convert_hf_to_jaxalign", ["--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o1")], "no such model folder"),
        ("convert_jaxalign_to_hf", ["--ckpt_dir", base, "--output_dir", str(tmp_path / "o2")], "not a jaxalign checkpoint"),
        ("convert_value_head", ["--input_dir", base, "--output_dir", str(tmp_path / "o3")], "neither a *ForSequenceClassification"),
        ("convert_value_head", ["--input_dir", str(value_head_rm), "--output_dir", str(tmp_path / "o4"), "--to", "value_head"],
         "already in that layout"),
        ("convert_value_head", ["--input_dir", str(value_head_rm), "--output_dir", base], "already holds a model"),
    ]
    for name, argv, words in cases:
        capsys.readouterr()
        assert tool(name)(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith(f"{name}: error: ") and words in line, line
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
