"""KTO training: one compiled step equals the paper's loss worked out in numpy; it learns; bad rows."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxalign.cli import main
from jaxalign.trainers.kto import KTO
from jaxalign.trainers.run import build_trainer
from helpers import config, conv, compiled_call, make_model_dir, np_sigmoid, np_token_logps, write_jsonl

WORDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "navy"]


def kto_rows():
    # desirable replies end in "yes", undesirable in "no": separable by the last tokens
    return [{"messages": conv(f"is {w} ok?", "sure yes" if i % 2 == 0 else "no"), "label": i % 2 == 0}
            for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    return make_model_dir(root / "policy", seed=0), None, write_jsonl(root / "kto.jsonl", kto_rows())


BETA, WD, WU = 0.5, 1.3, 0.7


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """Eval before training; one step; the next step checked by hand (policy != reference by then);
    then more steps of the same compiled function; eval on the training rows."""
    policy, ref, data = folders
    cfg = config(policy, data, tmp_path_factory.mktemp("kto_out") / "out", rlhf_type="kto",
                 beta=BETA, desirable_weight=WD, undesirable_weight=WU, val_dataset=str(data),
                 per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=2,
                 max_steps=10, eval_steps=10, learning_rate=2e-3, save_hf=False)
    trainer = build_trainer(cfg, KTO(cfg), quiet=True)
    before = trainer.eval_metrics()
    trainer.train_step(trainer.algo.next_step_batch(trainer))
    batch = trainer.algo.next_step_batch(trainer)
    pol = compiled_call(trainer.model())
    ref_fwd = compiled_call(nnx.merge(trainer.graphdef, trainer.algo.ref_params, trainer.rest))
    expected = numpy_kto(batch, pol, ref_fwd)
    second = {k: float(v) for k, v in trainer.train_step(batch).items()}
    history = trainer.train()
    return expected, second, trainer, history, before


def numpy_kto(batch, pol, ref):
    """The KTO paper's loss per micro-batch, from per-token log-probs gathered with numpy."""

    def seq_logps(fwd, ids, attn, mask):
        return (np_token_logps(fwd(ids, attn), ids) * mask).sum(-1)

    losses, rewards, labels, kls = [], [], [], []
    for a in range(batch["input_ids"].shape[0]):
        m = {k: v[a] for k, v in batch.items()}
        lr = seq_logps(pol, m["input_ids"], m["attention_mask"], m["loss_mask"]) - seq_logps(
            ref, m["input_ids"], m["attention_mask"], m["loss_mask"])
        kl_lr = seq_logps(pol, m["kl_input_ids"], m["kl_attention_mask"], m["kl_loss_mask"]) - seq_logps(
            ref, m["kl_input_ids"], m["kl_attention_mask"], m["kl_loss_mask"])
        z0 = max(np.mean(kl_lr), 0.0)  # the reference point from the mismatched pairs
        lab = m["label"].astype(bool)
        row = np.where(lab, WD * (1 - np_sigmoid(BETA * (lr - z0))), WU * (1 - np_sigmoid(BETA * (z0 - lr))))
        losses.append(row), rewards.append(BETA * lr), labels.append(lab), kls.append(z0)
    return dict(losses=np.concatenate(losses), rewards=np.concatenate(rewards), labels=np.concatenate(labels), kls=kls)


def test_kto_step_matches_numpy(trained):
    e, metrics, _, _, _ = trained
    losses, rewards, labels = e["losses"], e["rewards"], e["labels"]
    assert 0 < labels.sum() < labels.size and max(e["kls"]) > 0  # both kinds present, z0 not clamped everywhere
    assert metrics["loss"] == pytest.approx(losses.mean(), rel=1e-5, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(rewards[labels].mean(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(rewards[~labels].mean(), rel=1e-4, abs=1e-6)
    margin = rewards[labels].mean() - rewards[~labels].mean()
    assert metrics["rewards/margins"] == pytest.approx(margin, rel=1e-4, abs=1e-6)
    assert metrics["kl"] == pytest.approx(np.mean(e["kls"]), rel=1e-4, abs=1e-6)


def test_kto_learns_separable_set(trained):
    _, _, trainer, history, before = trained
    assert before["eval_rewards/accuracies"] == 0.0  # policy == reference: every reward is 0
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_rewards/margins"] > 0
    assert trainer.counter.count == 1  # one compilation for the one bucket


def test_kto_row_without_label_is_refused(folders, tmp_path, capsys):
    policy, _, _ = folders
    rows = kto_rows()
    del rows[3]["label"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code = main(["rlhf", "--rlhf_type", "kto", "--model", str(policy), "--dataset", str(data),
                 "--output_dir", str(tmp_path / "out"), "--mesh", "data=1,fsdp=1,tensor=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "label" in err and "bad.jsonl line 4" in err
    assert "Traceback" not in err


def test_kto_and_rm_dispatch():
    from jaxalign.algorithms import make_algorithm
    from jaxalign.config import resolve
    from jaxalign.errors import ConfigError
    from jaxalign.trainers.reward import RewardModelling

    assert isinstance(make_algorithm(resolve("rlhf", None, {"rlhf_type": "kto"})), KTO)
    assert isinstance(make_algorithm(resolve("rlhf", None, {"rlhf_type": "rm"})), RewardModelling)
    with pytest.raises(ConfigError, match="precompute_ref_log_probs"):  # refused when the options are read
        resolve("rlhf", None, {"rlhf_type": "kto", "precompute_ref_log_probs": True})
