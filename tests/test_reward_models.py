"""Reward models as the ecosystem ships them (issue 21): ``*ForSequenceClassification`` folders built by
``transformers`` score in jaxalign as ``AutoModelForSequenceClassification`` scores them (Llama, Qwen2; right
and left padding; a real token equal to the pad id); ``--rm_head seq_cls`` trains a bias-free head and exports
a folder ``transformers`` loads with the same scores; GRPO and PPO run on a seq-cls reward model, PPO's value
model starting from it; bad folders are one-line errors. Every expected score comes from ``transformers``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from jaxalign.cli import main
from jaxalign.config import resolve
from jaxalign.convert import load_reward_model, reward_model_layout
from jaxalign.convert.export import export_checkpoint
from jaxalign.demo import build_char_tokenizer, make_prompt_rows
from jaxalign.errors import CheckpointError
from jaxalign.rewards.model_reward import RewardModelReward
from jaxalign.trainers.reward import RewardModelling
from jaxalign.trainers.run import build_trainer
from helpers import compiled_call, config, conv, make_model_dir, write_jsonl

MESH = "data=1,fsdp=1,tensor=1"
DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=128)
FAMILIES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
CLASSES = {"llama": transformers.LlamaForSequenceClassification, "qwen2": transformers.Qwen2ForSequenceClassification,
           "qwen3": transformers.Qwen3ForSequenceClassification}


def hf_seq_cls_folder(path, family: str, *, vocab: int, pad: int, seed: int = 0, num_labels: int = 1, **over) -> str:
    """A random-weight ``*ForSequenceClassification`` folder written by transformers itself."""
    extra = {"head_dim": 8} if family == "qwen3" else {}
    cfg = FAMILIES[family](vocab_size=vocab, pad_token_id=pad, num_labels=num_labels, tie_word_embeddings=False,
                           **{**DIMS, **extra, **over})
    torch.manual_seed(seed)
    model = CLASSES[family](cfg).eval()
    with torch.no_grad():  # a score head big enough that the scores of different rows clearly differ
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def hf_scores(folder, ids, mask) -> np.ndarray:
    """``AutoModelForSequenceClassification`` logits [B] (float32)."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids, np.int64)),
                    attention_mask=torch.as_tensor(np.asarray(mask, np.int64)))
    return out.logits[:, 0].numpy()


def probe(vocab: int, pad: int, *, left: bool, seed: int = 0):
    """Rows of 12, 7 and 3 real tokens padded with ``pad`` on one side; a fourth row's last real tokens equal
    the pad id (as when pad == EOS), which transformers skips when it picks the scored token."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(pad + 1, vocab, size=(4, 12)).astype(np.int32)
    mask = np.zeros((4, 12), np.int32)
    for i, n in enumerate((12, 7, 3, 9)):
        cols = slice(12 - n, 12) if left else slice(0, n)
        mask[i, cols] = 1
    ids[mask == 0] = pad
    last = 11 if left else 8
    ids[3, last - 1 : last + 1] = pad  # two real tokens with the pad id at the end of row 3
    return ids, mask


# ----- loading sequence-classification folders -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_transformers_seq_cls_folder_scores_equal(family, left, tmp_path):
    folder = hf_seq_cls_folder(tmp_path / family, family, vocab=64, pad=0, seed=3)
    assert reward_model_layout(folder) == "seq_cls"
    ids, mask = probe(64, 0, left=left)
    theirs = hf_scores(folder, ids, mask)
    rm = load_reward_model(folder)
    assert rm.head == "seq_cls" and rm.pad_token_id == 0
    ours = np.asarray(compiled_call(rm, "scores")(ids, mask))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.ptp(theirs) > 1e-2  # the rows really differ
    # row 3: the scored token is the last one whose id is not the pad id, not the last attended one
    assert abs(float(theirs[3]) - float(np.asarray(rm.values(ids, mask))[3, (11 if left else 8)])) > 1e-4


def test_models_namespace_loads_both_layouts(tmp_path):
    from jaxalign import models
    from jaxalign.convert.seq_cls import convert_reward_model

    folder = hf_seq_cls_folder(tmp_path / "sc", "llama", vocab=64, pad=0, seed=1)
    convert_reward_model(folder, tmp_path / "vh")  # the same model in TRL's value-head layout
    ids, mask = probe(64, 0, left=False)
    ids, mask = ids[:3], mask[:3]  # rows without pad-id tokens: both layouts read the last attended token
    theirs = hf_scores(folder, ids, mask)
    for path, head in ((folder, "seq_cls"), (tmp_path / "vh", "value_head")):
        rm = models.load_reward_model(path)
        assert rm.head == head
        np.testing.assert_allclose(np.asarray(compiled_call(rm, "scores")(ids, mask)), theirs, atol=1e-4)


# ----- bad folders: one line naming the file and the fix, exit code 2 ------------------------------------------------
def _bad_folders(tmp_path, policy):
    two = hf_seq_cls_folder(tmp_path / "two_labels", "llama", vocab=64, pad=0, num_labels=2)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2ForSequenceClassification"],
                                                   "model_type": "gpt2", "num_labels": 1}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    cfg = json.loads((tmp_path / "two_labels" / "config.json").read_text())  # a good config, no weights beside it
    cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    (no_weights / "config.json").write_text(json.dumps(cfg))
    return {
        "num_labels": (two, ["config.json", "num_labels 2", "num_labels=1"]),
        "architecture": (str(other), ["config.json", "GPT2ForSequenceClassification", "LlamaForSequenceClassification"]),
        "no_head": (str(policy), ["value_head.safetensors", "--rlhf_type rm"]),
        "no_weights": (str(no_weights), ["no_weights", "safetensors"]),
        "missing": (str(tmp_path / "nope"), ["nope", "no such folder"]),
    }


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("policy") / "policy", seed=3)


@pytest.mark.parametrize("case", ["num_labels", "architecture", "no_head", "no_weights", "missing"])
def test_bad_reward_model_folders(case, policy_dir, tmp_path, capsys):
    path, words = _bad_folders(tmp_path, policy_dir)[case]
    with pytest.raises(CheckpointError) as e:
        load_reward_model(path)
    assert all(w in str(e.value) for w in words), str(e.value)
    if case in ("num_labels", "no_head"):  # through the command line: one line, exit code 2, nothing written
        data = write_jsonl(tmp_path / "p.jsonl", make_prompt_rows(8, seed=0, digits=(1, 2)))
        out = tmp_path / "o"
        capsys.readouterr()  # drop what building the folders printed
        rc = main(["rlhf", "--rlhf_type", "ppo", "--model", str(policy_dir), "--dataset", data, "--output_dir", str(out),
                   "--mesh", MESH, "--max_completion_length", "4", "--reward_model", path])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith("jaxalign: error: --reward_model "), err
        assert all(w in err[0] for w in words), err
        assert not (out / "logging.jsonl").exists()


# ----- --rm_head seq_cls: trained here, loaded by transformers ---------------------------------------------------------
WORDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "navy"]


@pytest.fixture(scope="module")
def seq_cls_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_seqcls")
    base = make_model_dir(root / "base", seed=0)
    rows = [{"messages": conv(f"is {w} ok?", "yes"), "rejected_response": "no"} for w in WORDS]
    data = write_jsonl(root / "pairs.jsonl", rows)
    cfg = config(base, data, root / "out", rlhf_type="rm", rm_head="seq_cls", per_device_train_batch_size=4,
                 max_steps=3, save_steps=3, learning_rate=3e-3, seed=5)
    trainer = build_trainer(cfg, RewardModelling(cfg), quiet=True)
    history = trainer.train()
    trainer.export()
    return trainer, history, root


def test_seq_cls_rm_export_loads_in_transformers(seq_cls_rm):
    from safetensors.numpy import load_file

    trainer, history, root = seq_cls_rm
    out = root / "out"
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    model = trainer.model()
    assert model.head == "seq_cls"
    # the bias exists for the shared layout but is never applied, so it stays exactly 0 through training
    assert float(np.asarray(model.v_head.summary.bias[...])[0]) == 0.0
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["score.weight"].shape == (1, 32) and "lm_head.weight" not in tensors
    assert not any("bias" in k and "score" in k for k in tensors) and not (out / "value_head.safetensors").exists()
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"] and hf_cfg["pad_token_id"] == 0
    tok = build_char_tokenizer()
    ids, mask = probe(len(tok), tok.pad_token_id, left=False, seed=1)
    theirs = hf_scores(out, ids, mask)
    np.testing.assert_allclose(np.asarray(compiled_call(model, "scores")(ids, mask)), theirs, atol=1e-4)
    np.testing.assert_allclose(np.asarray(compiled_call(load_reward_model(out), "scores")(ids, mask)), theirs, atol=1e-4)
    # the checkpoint exports to the same folder layout (jaxalign export --ckpt_dir)
    dst, line = export_checkpoint(out / "checkpoint-3", root / "from_ckpt")
    assert "ForSequenceClassification" in line
    np.testing.assert_allclose(hf_scores(dst, ids, mask), theirs, atol=1e-5)


def test_rm_head_value_head_is_the_default(policy_dir, tmp_path):
    cfg = resolve("rlhf", None, {"rlhf_type": "rm", "model": str(policy_dir), "dataset": "x"})
    assert cfg.rm_head == "value_head"


def test_rm_head_seq_cls_with_lora_is_refused(policy_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"messages": conv("a", "yes"), "rejected_response": "no"}] * 4)
    rc = main(["rlhf", "--rlhf_type", "rm", "--rm_head", "seq_cls", "--tuner_type", "lora", "--model", str(policy_dir),
               "--dataset", data, "--output_dir", str(tmp_path / "o"), "--mesh", MESH])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "--rm_head seq_cls" in err[0], err


# ----- GRPO and PPO on a sequence-classification reward model ----------------------------------------------------------
@pytest.fixture(scope="module")
def rl_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_seqcls")
    tok = build_char_tokenizer()
    policy = make_model_dir(root / "policy", seed=3)
    rm = hf_seq_cls_folder(root / "rm", "qwen2", vocab=len(tok), pad=tok.pad_token_id, seed=4,
                           max_position_embeddings=512)
    data = write_jsonl(root / "prompts.jsonl", make_prompt_rows(16, seed=5, digits=(1, 2)))
    return {"root": root, "tok": tok, "policy": policy, "rm": rm, "data": data}


def test_grpo_reward_from_seq_cls_model(rl_env, tmp_path):
    tok = rl_env["tok"]
    name, reward = RewardModelReward.from_path(rl_env["rm"], tok, vocab_size=len(tok))
    prompts = [tok.encode("12+7="), tok.encode("3+4=")]
    completions = [tok.encode("19") + [tok.eos_token_id], tok.encode("8")]
    got = reward(["", ""], prompt_ids=prompts, completion_ids=completions)
    seqs = [p + c for p, c in zip(prompts, completions)]
    ids = np.full((2, max(map(len, seqs))), tok.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    np.testing.assert_allclose(got, hf_scores(rl_env["rm"], ids, mask), atol=1e-4)
    # one GRPO step with only the reward model as reward
    out = tmp_path / "grpo"
    rc = main(["rlhf", "--rlhf_type", "grpo", "--model", str(rl_env["policy"]), "--dataset", rl_env["data"],
               "--output_dir", str(out), "--mesh", MESH, "--max_length", "32", "--length_buckets", "16,32",
               "--num_generations", "4", "--max_completion_length", "4", "--per_device_train_batch_size", "8",
               "--gradient_checkpointing", "false", "--max_steps", "1", "--save_steps", "1000", "--logging_steps", "1",
               "--reward_model", rl_env["rm"], "--save_hf", "false"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    row = next(r for r in rows if "loss" in r)
    assert np.isfinite(row["loss"]) and np.isfinite(row[f"rewards/{name}/mean"]) and row[f"rewards/{name}/std"] > 0


def test_ppo_on_seq_cls_reward_model(rl_env):
    root = rl_env["root"]
    cfg = resolve("rlhf", None, dict(
        rlhf_type="ppo", model=str(rl_env["policy"]), reward_model=rl_env["rm"], dataset=rl_env["data"],
        output_dir=str(root / "ppo"), mesh=MESH, max_completion_length=6, per_device_train_batch_size=8,
        max_length=32, length_buckets="16,32", gradient_checkpointing=False, save_steps=1000, logging_steps=1,
        num_ppo_epochs=1, num_mini_batches=1, max_steps=1, num_sample_generations=0, learning_rate=1e-3,
        lr_scheduler_type="constant", weight_decay=0.0, seed=7))
    trainer = build_trainer(cfg, quiet=True)
    algo = trainer.algo
    arrays, metrics = algo.rollout(trainer, next(trainer.batches))
    ids, attn = arrays["query_responses"], arrays["attention_mask"]
    theirs = hf_scores(rl_env["rm"], ids, attn)
    assert np.std(theirs) > 1e-3
    assert metrics["objective/scores"] == pytest.approx(float(theirs.mean()), abs=1e-4)
    # the value model starts as the reward model: its value at the scored token is the transformers score
    value = trainer.model().value
    assert value.head == "seq_cls"
    np.testing.assert_allclose(np.asarray(compiled_call(value, "scores")(ids, attn)), theirs, atol=1e-4)
    history = trainer.train()
    assert np.isfinite([h["loss"] for h in history if "loss" in h]).all()
    trainer.export()
    # the trained value model is written in the layout it came in, and transformers reads it as jaxalign does
    out = root / "ppo" / "value_model"
    assert reward_model_layout(out) == "seq_cls" and not (out / "value_head.safetensors").exists()
    np.testing.assert_allclose(hf_scores(out, ids, attn),
                               np.asarray(compiled_call(trainer.model().value, "scores")(ids, attn)), atol=1e-4)
