"""Reward model: one compiled step equals Bradley-Terry worked out in numpy; it learns; the exported
backbone + value_head.safetensors reproduce jaxalign's scores in PyTorch; load_reward_model round trip."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxalign.errors import CheckpointError
from jaxalign.convert import load_reward_model
from jaxalign.trainers.reward import RewardModelling
from jaxalign.trainers.run import build_trainer
from helpers import config, conv, make_model_dir, np_sigmoid, write_jsonl

WORDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "navy"]
CENTER = 0.01


def pair_rows():
    # chosen replies end in "yes", rejected ones in "no"; margins vary per row
    pre = ["", "ok ", "well ", "hm "]
    return [{"messages": conv(f"is {w} ok?", pre[i % 4] + "yes"), "rejected_response": pre[(i + 1) % 4] + "no",
             "margin": 0.25 * (i % 3)} for i, w in enumerate(WORDS)]


def numpy_scores(model, ids, mask):
    """Value at the last real token from a plain backbone forward, head applied with numpy."""
    graphdef, state = nnx.split(model.backbone)
    hidden = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s).hidden_states(i, m)[0])(state, ids, mask), np.float64)
    w = np.asarray(model.v_head.summary.kernel[...], np.float64)[:, 0]
    b = float(np.asarray(model.v_head.summary.bias[...])[0])
    last = np.array([np.nonzero(m)[0].max() for m in mask])
    return hidden[np.arange(len(ids)), last] @ w + b


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    policy = make_model_dir(root / "base", seed=0)
    data = write_jsonl(root / "pairs.jsonl", pair_rows())
    cfg = config(policy, data, root / "out", rlhf_type="rm", center_rewards_coefficient=CENTER, val_dataset=str(data),
                 per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=2,
                 max_steps=12, eval_steps=12, save_steps=12, learning_rate=3e-3,
                 seed=45)  # a head seed whose initial preferences are mostly wrong
    trainer = build_trainer(cfg, RewardModelling(cfg), quiet=True)
    before = trainer.eval_metrics()
    batch = trainer.algo.next_step_batch(trainer)
    model = trainer.model()
    chosen, rejected, margins = [], [], []
    for a in range(batch["chosen_input_ids"].shape[0]):
        chosen.append(numpy_scores(model, batch["chosen_input_ids"][a], batch["chosen_attention_mask"][a]))
        rejected.append(numpy_scores(model, batch["rejected_input_ids"][a], batch["rejected_attention_mask"][a]))
        margins.append(batch["margin"][a])
    expected = dict(chosen=np.concatenate(chosen), rejected=np.concatenate(rejected), margin=np.concatenate(margins))
    first = {k: float(v) for k, v in trainer.train_step(batch).items()}
    history = trainer.train()
    trainer.export()
    return expected, first, trainer, history, root / "out", before


def test_rm_step_matches_numpy(trained):
    e, m, _, _, _, _ = trained
    c, r, margin = e["chosen"], e["rejected"], e["margin"]
    assert np.any(margin != 0)
    bt = np.mean(-np.log(np_sigmoid(c - r - margin)))
    center = CENTER * np.mean((c + r) ** 2)
    assert m["loss"] == pytest.approx(bt + center, rel=1e-5, abs=1e-6)
    assert m["center_rewards_loss"] == pytest.approx(center, rel=1e-4, abs=1e-8)
    assert m["rewards/chosen"] == pytest.approx(c.mean(), rel=1e-4, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(r.mean(), rel=1e-4, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx((c - r).mean(), rel=1e-4, abs=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(np.mean(c > r)) == m["accuracy"]


def test_rm_learns_separable_set(trained):
    _, _, trainer, history, _, before = trained
    assert before["eval_accuracy"] < 0.9
    evals = [h for h in history if "eval_accuracy" in h]
    assert evals[-1]["eval_accuracy"] >= 0.9
    assert evals[-1]["eval_rewards/margins"] > 0
    assert trainer.counter.count == 1


def probe_batch(trainer):
    """Right-padded rows of different lengths (the padding holds junk ids the mask must hide)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(5, trainer.model_config.vocab_size, size=(3, 12)).astype(np.int32)
    mask = np.zeros((3, 12), np.int32)
    for i, n in enumerate((12, 7, 3)):
        mask[i, :n] = 1
    return ids, mask


def test_value_head_file_and_torch_parity(trained):
    from safetensors import safe_open
    from transformers import AutoModel

    _, _, trainer, _, out, _ = trained
    hidden = trainer.model_config.hidden_size
    with safe_open(str(out / "value_head.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["v_head.summary.bias", "v_head.summary.weight"]
        assert f.metadata() == {"format": "pt"}
        w, b = f.get_tensor("v_head.summary.weight"), f.get_tensor("v_head.summary.bias")
    assert tuple(w.shape) == (1, hidden) and tuple(b.shape) == (1,)
    ids, mask = probe_batch(trainer)
    ours = np.asarray(trainer.model().scores(ids, mask))
    backbone = AutoModel.from_pretrained(str(out)).eval()
    theirs = []
    with torch.no_grad():
        for row, m in zip(ids, mask):  # each row alone, unpadded: value at its last token
            h = backbone(input_ids=torch.tensor(row[m.astype(bool)][None], dtype=torch.long),
                         output_hidden_states=True).hidden_states[-1]
            theirs.append(float((h[0, -1] @ w[0] + b[0]).item()))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.ptp(ours) > 1e-3  # the rows really differ


def test_load_reward_model_round_trip(trained, tmp_path):
    from jaxalign.convert.checkpoint_io import load_checkpoint_model

    _, _, trainer, _, out, _ = trained
    ids, mask = probe_batch(trainer)
    ours = np.asarray(trainer.model().scores(ids, mask))
    np.testing.assert_allclose(np.asarray(load_reward_model(out).scores(ids, mask)), ours, atol=1e-5)
    ckpt = load_checkpoint_model(out / "checkpoint-12", value_head=True)  # the last step's checkpoint
    np.testing.assert_allclose(np.asarray(ckpt.scores(ids, mask)), ours, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == trainer.model_config.hidden_size
    values = np.asarray(trainer.model().values(ids, mask))
    assert values.shape == ids.shape and values[1, 6] == pytest.approx(ours[1], abs=1e-5)


def test_load_reward_model_refuses_missing_or_misshaped_head(trained, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    _, _, _, _, out, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("checkpoint-*", "value_head.safetensors"))
    with pytest.raises(CheckpointError, match="value_head.safetensors"):
        load_reward_model(bad)
    save_file({"v_head.summary.weight": np.zeros((1, 3), np.float32), "v_head.summary.bias": np.zeros(1, np.float32)},
              str(bad / "value_head.safetensors"))
    with pytest.raises(CheckpointError, match=r"v_head.summary.weight.*\[1, 3\]"):
        load_reward_model(bad)
