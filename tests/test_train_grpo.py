"""GRPO training (issue 7): one update equals the formula worked out in numpy for every loss type
and for GSPO, micro-batches equal one big batch, nothing recompiles, logs and completions are
written, reward errors stop the run, the 8-device run equals the single-device one, and DAPO's
dynamic sampling replaces flat groups."""

from __future__ import annotations

import functools
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

import jaxalign.rewards
from jaxalign.cli import main
from jaxalign.convert import load_hf_model
from jaxalign.demo import make_prompt_rows
from jaxalign.rollout import trace_count
from jaxalign.data.batching import stack_micro_batches
from jaxalign.trainers.run import build_trainer
from helpers import one_error_line, config, make_model_dir, per_completion_rows, write_jsonl

G, C, PROMPTS = 4, 5, 4  # group size, max_completion_length, prompts per generation (16 completions)
TEMPERATURE, BETA, EPS, EPS_HIGH_DAPO, LR = 0.9, 0.1, 0.2, 0.28, 2e-2
SINGLE = "data=1,fsdp=1,tensor=1"


def charsum(completions, **kwargs):
    """A reward that varies between completions of one prompt (so advantages are non-zero)."""
    return [(sum(map(ord, c)) % 7) / 6.0 for c in completions]


def half_flat(completions, solution, **kwargs):
    """Constant for prompts with an even answer (a flat group), ``charsum`` for the others."""
    return [0.5 if int(s) % 2 == 0 else r for r, s in zip(charsum(completions), solution)]


def boom(completions, **kwargs):
    raise RuntimeError("kaboom")


def wrong_count(completions, **kwargs):
    return [0.0]


REWARDS = {"test_charsum": charsum, "test_half_flat": half_flat, "test_boom": boom, "test_wrong_count": wrong_count}


@pytest.fixture(scope="module", autouse=True)
def _rewards():
    for name, fn in REWARDS.items():
        jaxalign.rewards.register(name)(fn)
    yield
    for name in REWARDS:
        jaxalign.rewards.unregister(name)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model = make_model_dir(root / "policy", seed=3)
    data = write_jsonl(root / "prompts.jsonl", make_prompt_rows(32, seed=5, digits=(1, 2)))
    return {"root": root, "model": model, "data": data, "n": 0}


def grpo_config(env, **over):
    env["n"] += 1
    flags = dict(rlhf_type="grpo", mesh=SINGLE, max_length=32, length_buckets="16,32", reward_funcs="test_charsum",
                 num_generations=G, max_completion_length=C, temperature=TEMPERATURE, beta=BETA, epsilon=EPS,
                 per_device_train_batch_size=PROMPTS * G, learning_rate=LR, max_steps=5, log_completions=True,
                 save_hf=False)
    flags.update(over)
    return config(env["model"], env["data"], env["root"] / f"run{env['n']}", **flags)


def build(env, **over):
    return build_trainer(grpo_config(env, **over), quiet=True)


def stacked(trainer, arrays):
    """All of a generation's micro-batches as one optimizer step (steps_per_generation == accumulation)."""
    assert trainer.algo.steps_per_generation == trainer.accum
    return stack_micro_batches(trainer.algo.micro_batches(trainer, arrays), trainer.pad_id)


# ----- a plain forward and the formula, in float64 numpy ------------------------------------------------
@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    return jax.jit(lambda state, ids, attn: nnx.merge(graphdef, state)(ids, attn))


def logits_of(model, ids, attn) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef)(state, ids, attn), np.float64)


def completion_logps(logits, ids, temperature):
    """(log-prob [B, C] of every completion token at ``temperature``, entropy [B, C]), float64."""
    p = ids.shape[1] - C
    z = logits[:, p - 1 : -1] / temperature  # position t-1 predicts token t
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, ids[:, p:, None], axis=-1)[..., 0]
    return picked, -(np.exp(logp) * logp).sum(-1)


def numpy_grpo(lp, old, ref, adv, mask, *, loss_type, level="token", eps_high=EPS):
    """GRPO's clipped surrogate + beta * k3 KL, with each loss type's normalisation written out."""
    mask = mask.astype(np.float64)
    n_tok = mask.sum(1)
    if level == "token":
        log_ratio = lp - old
    else:  # GSPO: the length-normalised sequence log-ratio, the same for every token of a row
        log_ratio = np.repeat(((lp - old) * mask).sum(1, keepdims=True) / np.maximum(n_tok, 1)[:, None], C, 1)
    ratio = np.exp(log_ratio)
    a = adv.astype(np.float64)[:, None]
    surrogate = -np.minimum(ratio * a, np.clip(ratio, 1 - EPS, 1 + eps_high) * a)
    d = ref - lp
    kl = np.exp(d) - d - 1
    per_token = surrogate + BETA * kl
    if loss_type == "grpo":  # mean over rows of each row's token mean
        loss = np.mean((per_token * mask).sum(1) / np.maximum(n_tok, 1))
    elif loss_type in ("bnpo", "dapo"):  # token sum over the token count of the whole batch
        loss = (per_token * mask).sum() / mask.sum()
    else:  # dr_grpo: token sum over rows x max_completion_length
        loss = (per_token * mask).sum() / (mask.shape[0] * C)

    def tmean(x):
        return float((x * mask).sum() / mask.sum())

    low, high = (ratio < 1 - EPS) & (a < 0), (ratio > 1 + eps_high) & (a > 0)
    return {"loss": float(loss), "kl": tmean(kl), "clip_ratio/low_mean": tmean(low),
            "clip_ratio/high_mean": tmean(high), "clip_ratio/region_mean": tmean(low | high)}


# ----- one generation, shared by the update tests ---------------------------------------------------------
@pytest.fixture(scope="module")
def generation(env):
    trainer = build(env)
    prompt_batch = next(trainer.batches)
    solutions = [e["solution"] for e in prompt_batch["extras"]]
    arrays, metrics, samples = trainer.algo.generation_batch_arrays(trainer, prompt_batch)
    assert trainer.algo.pack == G  # the default: each prompt once with its group's completions
    flat = per_completion_rows(arrays)  # a sequence per completion, for the numpy formulas
    reference = load_hf_model(env["model"])  # the initial model, read from disk again
    ref_logits = logits_of(reference, flat["input_ids"], flat["attention_mask"])
    # At step 1 the policy is the reference (KL 0) and the rollout's old log-probs equal the
    # policy's (ratio 1, no clipping). Perturbing old_logps makes the ratios spread over both
    # clipping bounds from step 1; the update tests also check step 2, where the policy has moved
    # away from the reference, so the KL term is non-zero.
    noise = np.random.default_rng(0).normal(0.0, 0.3, arrays["old_logps"].shape).astype(np.float32)
    perturbed = {**arrays, "old_logps": (arrays["old_logps"] + noise) * arrays["completion_mask"]}
    return {"arrays": arrays, "flat": flat, "metrics": metrics, "samples": samples, "solutions": solutions,
            "ref_logits": ref_logits, "perturbed": perturbed, "trainer": trainer}


def test_generation_arrays_and_advantages(generation):
    packed, samples, metrics = generation["arrays"], generation["samples"], generation["metrics"]
    arrays = generation["flat"]
    ids, mask = arrays["input_ids"], arrays["completion_mask"]
    assert generation["trainer"].mesh.devices.size == 1  # --mesh data=1,fsdp=1,tensor=1 on 8 devices
    assert packed["input_ids"].shape == (PROMPTS, ids.shape[1] - C + G * C)  # a row per prompt: it, then its G
    assert ids.shape[0] == PROMPTS * G and mask.shape == (PROMPTS * G, C)
    assert np.array_equal(arrays["attention_mask"][:, -C:], mask)  # no overlong filter
    # rows of a group share the prompt; rewards are the reward function's on the decoded completions
    p = ids.shape[1] - C
    for g in range(PROMPTS):
        assert (ids[g * G : (g + 1) * G, :p] == ids[g * G, :p]).all()
    rewards = np.array([s["reward"] for s in samples], np.float64)
    np.testing.assert_allclose(rewards, charsum([s["completion"] for s in samples]), rtol=1e-6)
    # advantages by hand: (r - group mean) / (unbiased group std + 1e-4)
    groups = rewards.reshape(PROMPTS, G)
    expected = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(arrays["advantages"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([s["advantage"] for s in samples], expected, rtol=1e-5, atol=1e-5)
    assert metrics["reward"] == pytest.approx(rewards.mean(), rel=1e-5)
    assert metrics["frac_reward_zero_std"] == pytest.approx(np.mean(groups.std(1) == 0))
    # the rollout's log-probs are the initial model's at the sampling temperature
    lp, _ = completion_logps(generation["ref_logits"], ids, TEMPERATURE)
    assert np.abs((lp - arrays["old_logps"]) * mask).max() < 1e-4


def test_greedy_log_probs_are_at_temperature_one(generation):
    """--temperature 0 (greedy): the sampler records log-probs at temperature 1, so must the update
    (dividing the logits by 0 gave NaN)."""
    from jaxalign.trainers.grpo_step import completion_logps as update_logps

    arrays = generation["arrays"]
    lp, ent = update_logps(generation["trainer"].model(), arrays, 0.0)
    expected, expected_ent = completion_logps(generation["ref_logits"], generation["flat"]["input_ids"], 1.0)
    np.testing.assert_allclose(np.asarray(lp), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), expected_ent, atol=1e-5)


# ----- the update ---------------------------------------------------------------------------------------------
CASES = {  # name: (loss_type, importance_sampling_level, gradient_accumulation_steps)
    "grpo": ("grpo", "token", 1),
    "grpo-accum4": ("grpo", "token", 4),
    "dapo": ("dapo", "token", 1),
    "dapo-accum4": ("dapo", "token", 4),
    "dr_grpo": ("dr_grpo", "token", 1),
    "dr_grpo-accum4": ("dr_grpo", "token", 4),
    "gspo": ("grpo", "sequence", 1),
}


@pytest.fixture(scope="module")
def updates(env, generation):
    """Per case (built on first use): two train steps on the same perturbed generation, with the
    numpy expectation of each from a plain forward of the policy before that step."""
    done = {}

    def get(name):
        if name in done:
            return done[name]
        loss_type, level, accum = CASES[name]
        eps_high = EPS_HIGH_DAPO if loss_type == "dapo" else None  # DAPO's clip-higher
        trainer = build(env, loss_type=loss_type, importance_sampling_level=level,
                        per_device_train_batch_size=PROMPTS * G // accum, gradient_accumulation_steps=accum,
                        **({"epsilon_high": eps_high} if eps_high else {}))
        arrays = generation["perturbed"]
        flat = per_completion_rows(arrays)
        ids, attn = flat["input_ids"], flat["attention_mask"]
        ref_lp, _ = completion_logps(generation["ref_logits"], ids, TEMPERATURE)
        batch = stacked(trainer, arrays)
        assert batch["completion_mask"].shape[:2] == (accum, PROMPTS * G // accum)
        assert batch["input_ids"].shape[:2] == (accum, PROMPTS // accum)  # packed: one prompt's group a row
        out = {"trainer": trainer, "expected": [], "got": [], "entropy": []}
        for _ in range(2):
            lp, ent = completion_logps(logits_of(trainer.model(), ids, attn), ids, TEMPERATURE)
            out["expected"].append(numpy_grpo(lp, arrays["old_logps"], ref_lp, arrays["advantages"],
                                              arrays["completion_mask"], loss_type=loss_type, level=level,
                                              eps_high=eps_high or EPS))
            out["entropy"].append(float((ent * arrays["completion_mask"]).sum() / arrays["completion_mask"].sum()))
            out["got"].append({k: float(v) for k, v in jax.device_get(trainer.train_step(batch)).items()})
        done[name] = out
        return out

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_update_equals_numpy(updates, name):
    run = updates(name)
    for step, (expected, got, entropy) in enumerate(zip(run["expected"], run["got"], run["entropy"]), 1):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=2e-4, abs=2e-6), (step, key)
        assert got["entropy"] == pytest.approx(entropy, rel=1e-4)
        assert got["grad_norm"] > 0
    first, second = run["expected"]
    assert first["kl"] == 0.0 and second["kl"] > 1e-6  # step 1: policy == reference; step 2: it moved
    assert first["clip_ratio/low_mean"] > 0 and first["clip_ratio/high_mean"] > 0  # both bounds clip
    assert abs(first["loss"]) > 1e-3


def test_shared_prefix_equals_a_sequence_per_completion(env, generation, updates):
    """--shared_prefix false trains each completion as its own prompt + completion sequence; on the same
    generation its two updates give the default's (one row per prompt and its group) losses, gradient norms and
    metrics to float32 rounding."""
    trainer = build(env, shared_prefix=False)
    assert trainer.algo.pack == 1
    batch = stacked(trainer, per_completion_rows(generation["perturbed"]))
    assert batch["input_ids"].shape[1] == PROMPTS * G  # a row per completion
    for packed, got in zip(updates("grpo")["got"], [trainer.train_step(batch) for _ in range(2)]):
        got = jax.device_get(got)
        for key in ("loss", "grad_norm", "kl", "clip_ratio/region_mean", "entropy", "rollout/logp_drift"):
            assert float(got[key]) == pytest.approx(packed[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_equal_one_big_batch(updates, loss_type):
    big, accum = updates(loss_type)["got"], updates(f"{loss_type}-accum4")["got"]
    # the 4 micro-batches hold different token counts (test_micro_batch_token_counts_differ), so
    # weighting them by row share where token share is due (or the reverse) would show here
    for b, a in zip(big, accum):
        for key in ("loss", "grad_norm", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy",
                    "rollout/logp_drift"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_micro_batch_token_counts_differ(generation):
    mask = generation["arrays"]["completion_mask"].reshape(4, -1).sum(1)
    assert len(set(mask.tolist())) > 1  # else token share and row share would coincide


def test_no_recompilation_logs_and_completions(updates):
    """Five steps of train() (five generations of 4 micro-batches) after the two steps above: one
    compilation of the update, and the sampler is not traced again after the first step."""
    trainer = updates("grpo-accum4")["trainer"]
    traces, counts = [], []
    step = trainer.train_step

    def recording(batch):
        out = step(batch)
        traces.append(trace_count())
        counts.append(trainer.counter.count)
        return out

    trainer.train_step = recording
    generation_before = trainer.algo.generation
    history = trainer.train()
    assert len(traces) == 5 and trainer.algo.generation == generation_before + 5
    assert counts == [1] * 5 and trainer.counter.count == 1
    assert traces == [traces[0]] * 5  # no new sampler trace after step 1
    out = trainer.out
    rows = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 5 and len(history) >= 5
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0 and r["compilations"] == 1
        for key in ("reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
                    "clip_ratio/region_mean", "rewards/test_charsum/mean", "time/generation_s"):
            assert key in r
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 5 * PROMPTS * G
    assert {"step", "prompt", "completion", "reward", "advantage", "test_charsum"} <= set(lines[0])
    for s in lines:
        assert s["reward"] == pytest.approx(charsum([s["completion"]])[0], rel=1e-6)


# ----- sharded ------------------------------------------------------------------------------------------------
def test_sharded_equals_single_device(env, generation, updates):
    """data=2, fsdp=2, tensor=2 on the 8 simulated devices: the same completions (the sampler's
    random draws do not depend on the mesh) and the same two updates as one device."""
    trainer = build(env, mesh="data=2,fsdp=2,tensor=2", per_device_train_batch_size=PROMPTS * G // 4)
    assert dict(trainer.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    big = max(jax.tree.leaves(trainer.state.params), key=lambda x: x.size)
    assert len(big.sharding.device_set) == 8 and big.addressable_shards[0].data.size < big.size
    arrays, metrics, _ = trainer.algo.generation_batch_arrays(trainer, next(trainer.batches))
    single = generation["arrays"]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert np.array_equal(arrays[key], single[key]), key
    np.testing.assert_allclose(arrays["old_logps"], single["old_logps"], atol=1e-5)
    np.testing.assert_allclose(arrays["advantages"], single["advantages"], atol=1e-5)
    assert metrics["reward"] == pytest.approx(generation["metrics"]["reward"])
    batch = stacked(trainer, generation["perturbed"])
    for one, got in zip(updates("grpo")["got"], [trainer.train_step(batch) for _ in range(2)]):
        got = jax.device_get(got)
        for key in ("loss", "kl", "grad_norm", "clip_ratio/region_mean", "entropy"):
            assert float(got[key]) == pytest.approx(one[key], rel=1e-4, abs=1e-7), key


# ----- DAPO dynamic sampling -------------------------------------------------------------------------------------
def test_dynamic_sample_replaces_flat_groups(env):
    plain = build(env, reward_funcs="test_half_flat")
    _, before, _ = plain.algo.generation_batch_arrays(plain, next(plain.batches))
    assert before["frac_reward_zero_std"] > 0  # some prompts of the first batch have even answers
    dyn = build(env, reward_funcs="test_half_flat", dynamic_sample=True, max_resample_times=3)
    prompt_batch = next(dyn.batches)
    first_prompts = prompt_batch["prompt_input_ids"].copy()
    arrays, after, samples = dyn.algo.generation_batch_arrays(dyn, prompt_batch)
    assert after["frac_reward_zero_std"] < before["frac_reward_zero_std"]
    assert dyn.algo.generation > 1  # it resampled
    replaced = [g for g in range(PROMPTS) if not (prompt_batch["prompt_input_ids"][g] == first_prompts[g]).all()]
    assert replaced
    rewards = np.array([s["reward"] for s in samples]).reshape(PROMPTS, G)
    assert all(rewards[g].std() > 0 for g in replaced)
    # the replacement groups carry their own prompts and answers: rewards recomputed from the prompt text
    flat = per_completion_rows(arrays)
    p = flat["input_ids"].shape[1] - C
    for i, s in enumerate(samples):
        a, b = map(int, re.search(r"(\d+)\+(\d+)=", s["prompt"]).groups())
        assert s["reward"] == pytest.approx(half_flat([s["completion"]], [str(a + b)])[0])
        assert (flat["input_ids"][i, :p] == prompt_batch["prompt_input_ids"][i // G]).all()


def test_cispo_without_epsilon_high_is_noted(env, capsys):
    build(env, loss_type="cispo")
    assert "--loss_type cispo caps the importance ratio at --epsilon_high" in capsys.readouterr().out
    build(env, loss_type="cispo", epsilon_high=5.0)
    assert "cispo" not in capsys.readouterr().out


def test_gdpo_normalises_each_reward_function_in_its_group(env):
    trainer = build(env, reward_funcs="test_charsum test_half_flat", reward_weights="1.0 0.5", scale_rewards="gdpo")
    _, metrics, samples = trainer.algo.generation_batch_arrays(trainer, next(trainer.batches))
    per_func = np.array([[s["test_charsum"], s["test_half_flat"]] for s in samples], np.float64)
    # by hand: each function (r - group mean) / (unbiased group std + 1e-8), 0 for a flat group; the weighted sum
    # (s - batch mean) / (unbiased batch std + 1e-8)
    groups = per_func.reshape(PROMPTS, G, 2)
    std = groups.std(1, ddof=1, keepdims=True)
    normalised = np.where(std > 0, (groups - groups.mean(1, keepdims=True)) / (std + 1e-8), 0.0).reshape(-1, 2)
    summed = normalised @ np.array([1.0, 0.5])
    expected = (summed - summed.mean()) / (summed.std(ddof=1) + 1e-8)
    assert (std == 0).any() and (std > 0).any()  # a flat group of test_half_flat and informative ones
    np.testing.assert_allclose([s["advantage"] for s in samples], expected, rtol=1e-5, atol=1e-5)
    rewards = per_func @ np.array([1.0, 0.5])
    assert metrics["reward_std"] == pytest.approx(np.mean(rewards.reshape(PROMPTS, G).std(1, ddof=1)), rel=1e-5)


# ----- the command line ----------------------------------------------------------------------------------------
def cli_args(env, out, *extra):
    return ["rlhf", "--rlhf_type", "grpo", "--model", str(env["model"]), "--dataset", str(env["data"]),
            "--output_dir", str(env["root"] / out), "--mesh", SINGLE, "--max_length", "32",
            "--length_buckets", "16,32", "--num_generations", str(G), "--max_completion_length", str(C),
            "--per_device_train_batch_size", str(PROMPTS * G), "--gradient_checkpointing", "false",
            "--max_steps", "2", "--save_steps", "1000", *extra]


@pytest.mark.parametrize("func,message", [("test_boom", "kaboom"),
                                          ("test_wrong_count", "returned 1 values for 16 completions")])
def test_reward_function_error_stops_the_run(env, capsys, func, message):
    assert main(cli_args(env, f"cli_{func}", "--reward_funcs", func)) == 2
    err = capsys.readouterr().err
    # stderr also holds the progress bar, started before the first generation; no traceback
    errors = [line for line in err.splitlines() if line.startswith("jaxalign: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"reward function '{func}'" in errors[0] and message in errors[0]
    # Nothing half-written: not args.json, logging.jsonl or tokenizer/, nor the folder the run made.
    assert not (env["root"] / f"cli_{func}").exists()


def test_missing_reward_funcs(env, capsys):
    assert main(cli_args(env, "cli_none")) == 2
    assert "--reward_funcs" in one_error_line(capsys.readouterr().err)
