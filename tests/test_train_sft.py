"""One compiled SFT step against a plain forward: the loss is the token-mean NLL, gradient
accumulation equals one big batch, and rematerialisation changes nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxalign.data import collate, prepare_data

from jaxalign.demo import build_char_tokenizer
from jaxalign.trainers.run import build_trainer
from jaxalign.trainers.sft import SFT
from jaxalign.trainers.step import build_train_step
from helpers import hf_logits, make_base, reference_nll, sft_config, short_rows, write_jsonl

ROWS = 8  # rows of the one optimizer step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_step")
    base = make_base(root / "base", seed=1)
    # Answers of 1-3 digits: the micro-batches below hold different numbers of response tokens.
    data = write_jsonl(root / "train.jsonl", short_rows(16, seed=3))
    return root, base, data


def trainer_for(setup, name, accum, **flags):
    root, base, data = setup
    cfg = sft_config(model=base, dataset=data, output_dir=str(root / name), max_steps=2,
                     per_device_train_batch_size=ROWS // accum, gradient_accumulation_steps=accum, **flags)
    return build_trainer(cfg, SFT(cfg), quiet=True)


@pytest.fixture(scope="module")
def batch(setup):
    """The step's 8 rows as one [8, 32] batch (the same rows for every trainer below)."""
    tok = build_char_tokenizer()
    examples = prepare_data(setup[2], "sft", tok, max_length=64).train
    rows = sorted(examples, key=lambda ex: -int(np.sum(ex.loss_mask)))[:ROWS]
    out = collate(rows, 32, tok.pad_token_id)
    return {k: np.asarray(v) for k, v in out.items() if k in ("input_ids", "attention_mask", "loss_mask")}


def as_micro_batches(batch, accum):
    return {k: v.reshape(accum, ROWS // accum, *v.shape[1:]) for k, v in batch.items()}


def one_step(setup, batch, name, accum, **flags):
    t = trainer_for(setup, name, accum, **flags)
    before = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(t.state.params))]
    metrics = jax.device_get(t.train_step(as_micro_batches(batch, accum)))
    after = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(t.state.params))]
    return t, {k: float(v) for k, v in metrics.items()}, before, after


@pytest.fixture(scope="module")
def reference(setup, batch):
    """Token-mean NLL and token accuracy from transformers' logits on the base weights."""
    _, base, _ = setup
    logits = hf_logits(base, batch["input_ids"], batch["attention_mask"])
    return reference_nll(logits, batch["input_ids"], batch["loss_mask"])


@pytest.fixture(scope="module")
def big(setup, batch):
    return one_step(setup, batch, "a1", 1)


@pytest.fixture(scope="module")
def accumulated(setup, batch):
    return one_step(setup, batch, "a4", 4)


def test_batch_is_a_real_sft_batch(batch):
    tokens = batch["loss_mask"].sum(axis=1)
    assert batch["loss_mask"][:, 0].sum() == 0  # the first token is never a target
    assert tokens.min() >= 2 and len(set(tokens.tolist())) > 1  # answers (+ <|im_end|>) of several lengths


def test_step_loss_is_token_mean_nll(big, accumulated, reference):
    nll, acc = reference
    assert 3.0 < nll < 6.0  # about log(80) for random weights
    for _, m, _, _ in (big, accumulated):
        np.testing.assert_allclose(m["loss"], nll, rtol=1e-5)
        np.testing.assert_allclose(m["token_acc"], acc, atol=1e-6)
        assert m["learning_rate"] == pytest.approx(1e-3)  # cosine at step 0 = peak


def test_accumulation_normalises_by_all_tokens(batch, reference, setup):
    """A mean of per-micro-batch means would differ from the reference by more than the tolerance."""
    _, base, _ = setup
    logits = hf_logits(base, batch["input_ids"], batch["attention_mask"])
    per_micro = [
        reference_nll(logits[i:i + 2], batch["input_ids"][i:i + 2], batch["loss_mask"][i:i + 2])[0]
        for i in range(0, ROWS, 2)
    ]
    assert abs(np.mean(per_micro) - reference[0]) > 1e-4


def test_accumulation_equals_one_big_batch(big, accumulated):
    _, m1, before1, after1 = big
    _, m4, before4, after4 = accumulated
    for k in ("loss", "token_acc", "grad_norm"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
    assert m1["grad_norm"] > 0.1
    for b1, b4 in zip(before1, before4):
        np.testing.assert_array_equal(b1, b4)  # both started from the same weights
    moved = 0
    for b, a1, a4 in zip(before1, after1, after4):
        np.testing.assert_allclose(a4, a1, atol=1e-5)
        moved += np.abs(a1 - b).max() > 1e-4
    assert moved == len(before1)  # every parameter was updated (lr 1e-3)


def test_gradient_checkpointing_gives_the_same_step(setup, batch, big):
    t, m, _, after = one_step(setup, batch, "remat", 1, gradient_checkpointing=True)
    # The step really rematerialises: the traced step contains a remat (checkpoint) region.
    fn = build_train_step(t.graphdef, t.rest, t.algo.loss_fn, t.algo.totals_fn, t.optimizer, t.schedule)
    jaxpr = str(jax.make_jaxpr(fn)(t.state, as_micro_batches(batch, 1), None))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    _, m1, _, after1 = big
    for k in ("loss", "token_acc", "grad_norm"):
        np.testing.assert_allclose(m[k], m1[k], rtol=1e-5, err_msg=k)
    for a, a1 in zip(after, after1):
        np.testing.assert_allclose(a, a1, atol=1e-5)
