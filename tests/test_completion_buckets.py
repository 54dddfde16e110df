"""GRPO and PPO cut a rollout to the completion bucket of its longest completion and its prompts to the bucket of
the longest prompt (issue 19): the buckets, the same GRPO loss on the cut batch as on the whole budget and the
whole padded prompt width, and the update compiling once per bucket used."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxalign.rewards
from jaxalign.demo import make_prompt_rows
from jaxalign.trainers.algorithm import completion_buckets
from jaxalign.trainers.grpo import update_arrays
from jaxalign.trainers.run import build_trainer
from helpers import config, make_model_dir, read_jsonl, rewrite_config, write_jsonl

G, PROMPTS, BUDGET = 4, 4, 40  # buckets 16, 32, 40


def lengthy(completions, **kwargs):
    """Varies within a group, so advantages are non-zero."""
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module", autouse=True)
def _reward():
    jaxalign.rewards.register("test_lengthy")(lengthy)
    yield
    jaxalign.rewards.unregister("test_lengthy")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    model = make_model_dir(root / "policy", seed=3)
    # A fifth of the vocabulary stops a completion (the random model samples near uniformly), so rollouts end
    # well inside the budget, as a trained model's do.
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rewrite_config(model, eos_token_id=list(range(vocab - vocab // 5, vocab)))
    return {"root": root, "model": model,
            "data": write_jsonl(root / "prompts.jsonl", make_prompt_rows(32, seed=5, digits=(1, 2)))}


def grpo(env, name, **over):
    flags = dict(rlhf_type="grpo", mesh="data=1,fsdp=1,tensor=1", max_length=32, length_buckets="16,32",
                 reward_funcs="test_lengthy", num_generations=G, max_completion_length=BUDGET, temperature=1.0,
                 beta=0.1, per_device_train_batch_size=PROMPTS * G, learning_rate=1e-2, max_steps=4, logging_steps=1,
                 save_hf=False)
    flags.update(over)
    return build_trainer(config(env["model"], env["data"], env["root"] / name, **flags), quiet=True)


def test_buckets():
    assert completion_buckets(64) == [16, 32, 64]
    assert completion_buckets(40) == [16, 32, 40]
    assert completion_buckets(100) == [16, 32, 64, 100]
    assert completion_buckets(5) == [5]


def test_cut_batch_gives_the_loss_of_the_whole_budget(env):
    trainer = grpo(env, "loss")
    algo = trainer.algo
    batch = next(trainer.batches)
    roll = algo.sample(trainer, batch["prompt_input_ids"], batch["prompt_attention_mask"], n=G)
    longest = int(roll["lengths"].max())
    assert roll["tokens"].shape[1] == BUDGET and longest < BUDGET, "needs a rollout shorter than the budget"
    cut = algo.cut_completions({k: v.copy() for k, v in roll.items()})
    width = cut["tokens"].shape[1]
    assert width == min(b for b in completion_buckets(BUDGET) if b >= longest) and width < BUDGET
    np.testing.assert_array_equal(roll["tokens"][:, width:], trainer.pad_id)  # only padding was dropped
    assert not roll["mask"][:, width:].any()

    adv = np.linspace(-1.0, 1.0, roll["tokens"].shape[0]).astype(np.float32)
    model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.rest)

    def loss_of(r):
        arrays = update_arrays(batch["prompt_input_ids"], batch["prompt_attention_mask"], r, adv,
                               num_generations=G, overlong_filter=False)
        # a perturbed old policy, so the ratio and clipping are exercised
        arrays["old_logps"] = arrays["old_logps"] + 0.05 * arrays["completion_mask"]
        micro = {k: jnp.asarray(v) for k, v in arrays.items()}
        loss, metrics = algo.loss_fn(model, micro, algo.totals_fn(micro), algo.extra(), jax.random.key(0))
        return float(loss), {k: float(v) for k, v in metrics.items()}

    whole, cut_loss = loss_of(roll), loss_of(cut)
    assert cut_loss[0] == pytest.approx(whole[0], abs=1e-6)
    for key in ("kl", "entropy", "clip_ratio/region_mean"):
        assert cut_loss[1][key] == pytest.approx(whole[1][key], abs=1e-6), key


def test_update_compiles_once_per_bucket(env):
    trainer = grpo(env, "compiles", max_steps=6)
    trainer.train()
    rows = [r for r in read_jsonl(env["root"] / "compiles" / "logging.jsonl") if "loss" in r]
    lengths = [r["completions/max_length"] for r in rows]
    used = {min(b for b in completion_buckets(BUDGET) if b >= m) for m in lengths}
    assert rows[-1]["compilations"] == len(used) <= len(completion_buckets(BUDGET))


def test_cut_prompts_give_the_loss_of_the_padded_batch(env):
    """Prompts left-padded 40 columns wider than the data made them: cut back to the bucket of the longest prompt,
    the GRPO loss and metrics equal the wide batch's."""
    trainer = grpo(env, "prompts")
    algo = trainer.algo
    batch = next(trainer.batches)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    roll = algo.cut_completions(algo.sample(trainer, ids, mask, n=G))
    wide_ids = np.pad(ids, ((0, 0), (40, 0)), constant_values=trainer.pad_id)
    wide_mask = np.pad(mask, ((0, 0), (40, 0)))
    cut_ids, cut_mask = algo.cut_prompts(wide_ids, wide_mask)
    longest = int(mask.sum(axis=1).max())
    width = min(b for b in completion_buckets(wide_ids.shape[1]) if b >= longest)
    assert cut_ids.shape == (ids.shape[0], width) and width < wide_ids.shape[1]
    np.testing.assert_array_equal(cut_mask.sum(axis=1), mask.sum(axis=1))  # every real token kept
    np.testing.assert_array_equal(cut_ids[cut_mask > 0], ids[mask > 0])

    adv = np.linspace(-1.0, 1.0, roll["tokens"].shape[0]).astype(np.float32)
    model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.rest)

    def loss_of(prompt_ids, prompt_mask):
        arrays = update_arrays(prompt_ids, prompt_mask, roll, adv, num_generations=G, overlong_filter=False)
        arrays["old_logps"] = arrays["old_logps"] + 0.05 * arrays["completion_mask"]
        micro = {k: jnp.asarray(v) for k, v in arrays.items()}
        loss, metrics = algo.loss_fn(model, micro, algo.totals_fn(micro), algo.extra(), jax.random.key(0))
        return float(loss), {k: float(v) for k, v in metrics.items()}

    wide, cut = loss_of(wide_ids, wide_mask), loss_of(cut_ids, cut_mask)
    assert cut[0] == pytest.approx(wide[0], abs=1e-6)
    for key in ("kl", "entropy", "clip_ratio/region_mean"):
        assert cut[1][key] == pytest.approx(wide[1][key], abs=1e-6), key
