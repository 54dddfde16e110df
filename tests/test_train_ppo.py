"""PPO (issue 8): one update equals an independent float64 computation (rollout log-probs, values and
scores from plain forwards, KL + EOS-penalty rewards, GAE, whitening, clipped policy and value losses);
the value model starts from the reward model; no recompilation after the first update; TRL metric names,
samples.jsonl and the export; a missing or mismatched --reward_model is refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxalign.config import resolve
from jaxalign.convert import load_hf_model, save_hf_model
from jaxalign.convert import load_reward_model, save_reward_model
from jaxalign.demo import build_char_tokenizer, make_prompt_rows
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.models.value_head import new_reward_model
from helpers import compiled_call, write_jsonl

MESH = "data=1,fsdp=1,tensor=1"
C = 6  # max_completion_length
HP = dict(temperature=0.9, kl_coef=0.2, missing_eos_penalty=1.5, gamma=0.97, lam=0.9, cliprange=0.2,
          cliprange_value=0.05, vf_coef=0.1)
TRL_KEYS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
            "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
            "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/num_eos_tokens", "lr", "episode", "eps")


def tiny_config(tok, vocab=None):
    return llama_config(vocab or len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tok = build_char_tokenizer()
    save_hf_model(random_model(tiny_config(tok), seed=0), root / "policy", tokenizer=tok)
    save_hf_model(random_model(tiny_config(tok), seed=3), root / "ref", tokenizer=tok)
    rm = new_reward_model(random_model(tiny_config(tok), seed=1), seed=2, std=0.5)
    save_reward_model(rm, root / "rm", tokenizer=tok)
    other = new_reward_model(random_model(tiny_config(tok, vocab=len(tok) + 8), seed=1), seed=2, std=0.5)
    save_reward_model(other, root / "rm_vocab", tokenizer=tok)
    write_jsonl(root / "prompts.jsonl", make_prompt_rows(16, seed=0, digits=(1, 2)))
    return root, tok


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def at_response(a, p):
    """Per-position outputs [B, T, ...] read where the response tokens are predicted: P-1 .. P+C-2."""
    return a[:, p - 1 : -1]


def picked_logps(logits, ids, p, temperature):
    lsm = np_log_softmax(at_response(logits, p) / temperature)
    resp = ids[:, p:]
    return np.take_along_axis(lsm, resp[..., None], axis=-1)[..., 0], lsm


def masked_mean(x, m):
    return float((x * m).sum() / m.sum())


def reference_update(ids, attn, p, *, policy_logits, ref_logits, values_all, rm_values, eos_id):
    """Everything the first PPO update computes, in float64 numpy, from plain forward outputs."""
    t = HP["temperature"] + 1e-7  # TRL divides logits by (temperature + 1e-7)
    resp = ids[:, p:]
    b, c = resp.shape
    has_eos = (resp == eos_id).any(1)
    lengths = np.where(has_eos, (resp == eos_id).argmax(1) + 1, c)
    mask = (np.arange(c)[None, :] < lengths[:, None]).astype(np.float64)
    logp, lsm = picked_logps(policy_logits, ids, p, t)
    ref_logp, _ = picked_logps(ref_logits, ids, p, t)
    logp, ref_logp = logp * mask, ref_logp * mask
    values = at_response(np.asarray(values_all, np.float64), p) * mask
    last = np.array([np.nonzero(row)[0].max() for row in attn])
    scores = np.asarray(rm_values, np.float64)[np.arange(b), last] - HP["missing_eos_penalty"] * (~has_eos)
    kl = logp - ref_logp
    rewards = -HP["kl_coef"] * kl * mask
    rewards[np.arange(b), lengths - 1] += scores
    adv = np.zeros((b, c))
    for i in range(b):
        lastgae = 0.0
        for j in reversed(range(c)):
            if not mask[i, j]:
                continue
            nextv = values[i, j + 1] if j + 1 < c and mask[i, j + 1] else 0.0  # terminal after the last token
            delta = rewards[i, j] + HP["gamma"] * nextv - values[i, j]
            lastgae = delta + HP["gamma"] * HP["lam"] * lastgae
            adv[i, j] = lastgae
    returns = (adv + values) * mask
    mean = (adv * mask).sum() / mask.sum()
    var = ((adv - mean) ** 2 * mask).sum() / (mask.sum() - 1)
    white = (adv - mean) / np.sqrt(var + 1e-8) * mask
    ent = -(np.exp(lsm) * lsm).sum(-1)
    return dict(mask=mask, has_eos=has_eos, logps=logp, ref_logps=ref_logp, values=values, scores=scores,
                kl=kl, rewards=rewards, advantages=white, returns=returns, entropy=ent)


def clipped_losses(new_logp, new_values, e):
    """TRL's clipped policy loss and 0.5 * max clipped value loss, with their clip fractions."""
    m, a = e["mask"], e["advantages"]
    eps, cv = HP["cliprange"], HP["cliprange_value"]
    ratio = np.exp(new_logp - e["logps"])
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps))
    pg_clipfrac = ((a > 0) & (ratio > 1 + eps)) | ((a < 0) & (ratio < 1 - eps))
    vclip = np.clip(new_values, e["values"] - cv, e["values"] + cv)
    l1, l2 = (new_values - e["returns"]) ** 2, (vclip - e["returns"]) ** 2
    return {
        "loss/policy_avg": masked_mean(pg, m),
        "policy/clipfrac_avg": masked_mean(pg_clipfrac, m),
        "policy/approxkl_avg": 0.5 * masked_mean((new_logp - e["logps"]) ** 2, m),
        "val/ratio": masked_mean(ratio, m),
        "loss/value_avg": 0.5 * masked_mean(np.maximum(l1, l2), m),
        "val/clipfrac_avg": masked_mean(l2 > l1, m),
    }


def ppo_config(root, out, **over):
    flags = dict(rlhf_type="ppo", model=str(root / "policy"), ref_model=str(root / "ref"), reward_model=str(root / "rm"),
                 dataset=str(root / "prompts.jsonl"), output_dir=str(out), mesh=MESH, max_completion_length=C,
                 per_device_train_batch_size=8, max_length=32, length_buckets="16,32", gradient_checkpointing=False,
                 save_steps=1000, logging_steps=1, local_rollout_forward_batch_size=3,  # chunks of 3, 3, 2 (padded)
                 num_ppo_epochs=1, num_mini_batches=1, max_steps=3, num_sample_generations=3, learning_rate=3e-3,
                 lr_scheduler_type="constant", weight_decay=0.0, seed=7, **HP)
    flags.update(over)
    return resolve("rlhf", None, flags)


@pytest.fixture(scope="module")
def run(folders):
    """One trainer: a rollout and two optimizer steps checked by hand, then three updates by train() and export."""
    from jaxalign.rollout.generate import trace_count
    from jaxalign.trainers.run import build_trainer

    root, tok = folders
    trainer = build_trainer(ppo_config(root, root / "out"), quiet=True)
    algo = trainer.algo
    batch = next(trainer.batches)
    p = batch["prompt_input_ids"].shape[1]
    for _ in range(12):  # a rollout with responses both with and without EOS (fixed seeds: deterministic)
        arrays, metrics = algo.rollout(trainer, batch)
        ended = (arrays["query_responses"][:, p:] == tok.eos_token_id).any(1)
        if ended.any() and not ended.all():
            break
    else:
        pytest.fail("no rollout mixed finished and unfinished responses")
    ids, attn = arrays["query_responses"], arrays["attention_mask"]

    # plain forwards of the models as saved on disk (the trainer has not updated anything yet)
    rm = load_reward_model(root / "rm")
    value_start = compiled_call(trainer.model().value, "values")(ids, attn)
    expected = reference_update(
        ids, attn, p, eos_id=tok.eos_token_id,
        policy_logits=compiled_call(load_hf_model(root / "policy"))(ids, attn),
        ref_logits=compiled_call(load_hf_model(root / "ref"))(ids, attn),
        values_all=compiled_call(rm, "values")(ids, attn),
        rm_values=compiled_call(rm, "values")(ids, attn),
    )
    rm_scores = compiled_call(rm, "scores")(ids, attn)

    first = algo.ppo_epochs(trainer, arrays, 0)
    models = trainer.model()  # after one optimizer step: read before the next step donates the state
    t = HP["temperature"] + 1e-7
    new_logp = picked_logps(compiled_call(models.policy)(ids, attn), ids, p, t)[0] * expected["mask"]
    new_values = at_response(np.asarray(compiled_call(models.value, "values")(ids, attn), np.float64), p) * expected["mask"]
    second_expected = clipped_losses(new_logp, new_values, expected)
    second = algo.ppo_epochs(trainer, arrays, 1)

    traces = []
    rollout = algo.rollout

    def spy(trainer_, prompt_batch):
        traces.append((trace_count(), trainer.counter.count))
        return rollout(trainer_, prompt_batch)

    algo.rollout = spy
    history = trainer.train()
    traces.append((trace_count(), trainer.counter.count))
    trainer.export()
    return dict(trainer=trainer, tok=tok, root=root, out=root / "out", p=p, batch=batch, arrays=arrays,
                metrics=metrics, expected=expected, value_start=value_start, rm_scores=rm_scores,
                first=first, second=second, second_expected=second_expected, history=history, traces=traces)


def test_rollout_matches_plain_forwards(run):
    a, e, p, batch = run["arrays"], run["expected"], run["p"], run["batch"]
    ids = a["query_responses"]
    np.testing.assert_array_equal(ids[:, :p], batch["prompt_input_ids"])
    np.testing.assert_array_equal(a["attention_mask"][:, :p], batch["prompt_attention_mask"])
    np.testing.assert_array_equal(a["response_mask"], e["mask"])
    np.testing.assert_array_equal(a["attention_mask"][:, p:], e["mask"])
    assert ids.shape[1] == p + C and e["has_eos"].any() and not e["has_eos"].all()
    np.testing.assert_array_equal(ids[:, p:][e["mask"] == 0], run["tok"].pad_token_id)  # pad after EOS
    assert np.abs(e["kl"] * e["mask"]).max() > 1e-2  # a distinct reference: the KL term is not zero
    np.testing.assert_allclose(a["logps"], e["logps"], atol=2e-5)
    np.testing.assert_allclose(a["values"], e["values"], atol=2e-5)
    np.testing.assert_allclose(a["returns"], e["returns"], rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(a["advantages"], e["advantages"], rtol=1e-4, atol=2e-4)
    m = run["metrics"]
    kl_sum = (e["kl"] * e["mask"]).sum(1)
    assert m["objective/scores"] == pytest.approx(e["scores"].mean(), abs=1e-5)
    assert m["objective/kl"] == pytest.approx(kl_sum.mean(), abs=1e-4)
    assert m["objective/non_score_reward"] == pytest.approx(-HP["kl_coef"] * kl_sum.mean(), abs=1e-4)
    assert m["objective/rlhf_reward"] == pytest.approx(e["scores"].mean() - HP["kl_coef"] * kl_sum.mean(), abs=1e-4)
    assert m["objective/entropy"] == pytest.approx(-e["logps"].sum(1).mean(), abs=1e-4)
    assert m["val/num_eos_tokens"] == e["has_eos"].sum()


def test_first_update_losses_match_numpy(run):
    (m,) = run["first"]
    e = run["expected"]
    # ratio 1 at the first step: the clipped terms are inactive
    assert m["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["policy/clipfrac_avg"] == 0.0 and m["val/clipfrac_avg"] == 0.0
    assert m["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)
    pg = masked_mean(-e["advantages"], e["mask"])
    vf = 0.5 * masked_mean((e["values"] - e["returns"]) ** 2, e["mask"])
    assert m["loss/policy_avg"] == pytest.approx(pg, abs=1e-5)
    assert m["loss/value_avg"] == pytest.approx(vf, rel=1e-4, abs=1e-6)
    assert m["loss"] == pytest.approx(pg + HP["vf_coef"] * vf, rel=1e-4, abs=1e-5)
    assert m["policy/entropy_avg"] == pytest.approx(masked_mean(e["entropy"], e["mask"]), rel=1e-4)


def test_second_step_clips_like_numpy(run):
    (m,) = run["second"]
    e = run["second_expected"]
    assert e["policy/clipfrac_avg"] > 0 and e["val/clipfrac_avg"] > 0  # both clips are exercised
    for k, v in e.items():
        assert m[k] == pytest.approx(v, rel=2e-4, abs=2e-5), k
    assert m["loss"] == pytest.approx(e["loss/policy_avg"] + HP["vf_coef"] * e["loss/value_avg"], rel=2e-4, abs=2e-5)


def test_value_model_starts_from_reward_model(run):
    attn = run["arrays"]["attention_mask"]
    last = np.array([np.nonzero(row)[0].max() for row in attn])
    start = run["value_start"][np.arange(len(last)), last]
    assert np.std(run["rm_scores"]) > 1e-2
    np.testing.assert_allclose(start, run["rm_scores"], rtol=1e-5, atol=1e-6)


def test_no_recompilation_after_first_update(run):
    trainer, traces = run["trainer"], run["traces"]
    assert trainer.counter.count == 1  # 2 manual optimizer steps, then 3 updates
    assert [c for _, c in traces] == [1, 1, 1, 1]
    assert len({t for t, _ in traces[1:]}) == 1, traces  # sampling and eval generations traced by update 1
    assert [r["compilations"] for r in run["history"] if "loss" in r] == [1, 1, 1]
    assert trainer.algo.rollout_forward_fn._cache_size() == 1
    assert trainer.step_fn._cache_size() == 1
    assert trainer.algo.score_fn._cache_size() == 1  # samples.jsonl scoring at each of the 3 updates


def test_logging_samples_and_export(run):
    import torch
    from transformers import AutoModelForCausalLM

    out, trainer = run["out"], run["trainer"]
    logged = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the samples hook logs the greedy responses' mean score beside each update (every 3 // 3 updates)
    assert [r["step"] for r in logged if "eval/scores" in r] == [1, 2, 3]
    for r in rows:
        missing = [k for k in TRL_KEYS if k not in r]
        assert not missing, missing
        assert all(np.isfinite(r[k]) for k in TRL_KEYS)
    assert [r["episode"] for r in rows] == [8, 16, 24]
    # episodes per second (an int, as TRL): the episodes so far over at least this row's own rollout and update time
    assert all(r["eps"] == int(r["eps"]) and 0 <= r["eps"] <= r["episode"] / (r["time/rollout_s"] + r["time/update_s"])
               for r in rows)
    assert rows[-1]["lr"] == pytest.approx(3e-3)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {s["step"] for s in samples} == {1, 2, 3}
    assert all(set(s) >= {"prompt", "response", "score"} for s in samples)
    assert (out / "checkpoint-3").is_dir()

    assert (out / "value_model" / "value_head.safetensors").is_file()
    ids, attn = run["arrays"]["query_responses"], run["arrays"]["attention_mask"]
    models = trainer.model()
    np.testing.assert_allclose(compiled_call(load_reward_model(out / "value_model"), "values")(ids, attn),
                               compiled_call(models.value, "values")(ids, attn), atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    p = run["p"]
    x = ids[:, p - 4 :]  # no padding on the left, so positions agree without a mask convention
    with torch.no_grad():
        got = hf(torch.as_tensor(x, dtype=torch.long)).logits.numpy()
    want = compiled_call(models.policy)(x, np.ones_like(x))
    np.testing.assert_allclose(got, want, atol=1e-4)


def _cli(argv, capsys):
    from jaxalign.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("case", ["no_value_head", "other_vocab", "missing"])
def test_bad_reward_model_refused(folders, tmp_path, capsys, case):
    root, _ = folders
    argv = ["rlhf", "--rlhf_type", "ppo", "--model", str(root / "policy"), "--dataset", str(root / "prompts.jsonl"),
            "--output_dir", str(tmp_path / "o"), "--mesh", MESH, "--max_completion_length", "4"]
    rm = {"no_value_head": root / "policy", "other_vocab": root / "rm_vocab", "missing": None}[case]
    if rm is not None:
        argv += ["--reward_model", str(rm)]
    rc, err = _cli(argv, capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("jaxalign: error:"), err
    expect = {"no_value_head": "value_head.safetensors", "other_vocab": "vocabulary", "missing": "--reward_model"}[case]
    assert expect in err, err
    if case == "no_value_head":
        assert str(root / "policy") in err, err
    assert not (tmp_path / "o" / "logging.jsonl").exists()


def test_several_mini_batches_and_epochs(folders, tmp_path):
    """num_mini_batches 2 x num_ppo_epochs 2: every epoch shuffles the whole rollout into full mini-batches (the
    second epoch once permuted only a micro-batch's worth of rows and crashed on an empty mini-batch)."""
    from jaxalign.trainers.run import build_trainer

    root, _ = folders
    trainer = build_trainer(ppo_config(root, tmp_path / "o", num_mini_batches=2, num_ppo_epochs=2, max_steps=1,
                                       per_device_train_batch_size=4, num_sample_generations=0, save_hf=False),
                            quiet=True)
    algo = trainer.algo
    arrays, _ = algo.rollout(trainer, next(trainer.batches))
    assert arrays["response_mask"].shape[0] == 8  # rollout = 2 mini-batches of 4
    seen = []
    step_on = trainer.step_on
    trainer.step_on = lambda micros: (seen.append(sorted(map(tuple, micros[0]["query_responses"].tolist()))),
                                      step_on(micros))[1]
    out = algo.ppo_epochs(trainer, arrays, 0)
    assert len(out) == 4 and all(len(s) == 4 for s in seen)
    rows = sorted(map(tuple, arrays["query_responses"].tolist()))
    assert sorted(seen[0] + seen[1]) == rows and sorted(seen[2] + seen[3]) == rows  # each epoch covers every row
