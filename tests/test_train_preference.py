"""Paired preference training (DPO / CPO / SimPO / ORPO): one compiled step against the paper's
formula written out in numpy, learning on a separable toy set, precomputed reference log-probs,
bad rows, and the sharded step against the single-device one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign.cli import main as cli_main
from jaxalign.config import load_config_file, resolve
from jaxalign.convert import save_hf_model
from jaxalign.demo import build_char_tokenizer
from jaxalign.demo.tiny_model import llama_config, random_model
from jaxalign.trainers.preference import PairPreference
from jaxalign.trainers.run import build_trainer
from helpers import per_reply_batch

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = "4,8,16,32"  # fine enough that a row holding the prompt once is shorter than two


# ----- fixtures -------------------------------------------------------------------------
def _rows(n: int) -> list[dict]:
    """Separable pairs: the chosen answer is always "yes", the rejected one "no"."""
    return [
        {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "yes"}],
         "rejected_response": "no"}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    tok = build_char_tokenizer()
    conf = llama_config(len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    policy, ref = random_model(conf, seed=0), random_model(conf, seed=1)
    save_hf_model(policy, root / "policy", tokenizer=tok)
    save_hf_model(ref, root / "ref", tokenizer=tok)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(32)))
    return {"root": root, "tok": tok, "policy": policy, "ref": ref, "data": data, "n": [0]}


def _cfg(env, **kw):
    env["n"][0] += 1
    flags = dict(
        model=str(env["root"] / "policy"), dataset=str(env["data"]), output_dir=str(env["root"] / f"out{env['n'][0]}"),
        gradient_checkpointing=False, max_length=32, length_buckets=BUCKETS, save_hf=False, save_steps=10_000,
        gradient_accumulation_steps=1, per_device_train_batch_size=4, mesh="data=1,fsdp=1,tensor=1",
        learning_rate=1e-5, logging_steps=1, lr_scheduler_type="constant",
    )
    flags.update(kw)
    return resolve("rlhf", None, flags)


def _trainer(env, **kw):
    cfg = _cfg(env, **kw)
    return build_trainer(cfg, PairPreference(cfg), quiet=True)


# ----- the reference computation, independent of jaxalign's log-prob code ------------------
def _seq_logps(model, ids, attn, mask):
    """(sum of response-token log-probs [N], response token counts [N], per-token logps [N, L] (every
    position; 0 at position 0 and on padding)) in float64."""
    logits = np.asarray(model(ids, attn), dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    tok = np.zeros(ids.shape, np.float64)
    for r in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            tok[r, t] = lsm[r, t - 1, ids[r, t]] * attn[r, t]
    mask = np.asarray(mask, np.float64)
    return (tok * mask).sum(-1), mask.sum(-1), tok


def _pair_logps(model, batch):
    """Over all micro-batches of [A, B, L] arrays: chosen/rejected sums, counts, chosen NLL token mean over
    the response (``nll``) and over prompt and response (``full_nll``, ORPO's as TRL computes it)."""
    out = {k: [] for k in ("c", "r", "nc", "nr", "ctok", "ftok", "nf")}
    batch = per_reply_batch(batch)  # DPO's default batches hold each prompt once: a sequence per reply here
    for a in range(batch["chosen_input_ids"].shape[0]):
        for side, key in (("chosen", "c"), ("rejected", "r")):
            attn, mask = batch[f"{side}_attention_mask"][a], batch[f"{side}_loss_mask"][a]
            s, n, tok = _seq_logps(model, batch[f"{side}_input_ids"][a], attn, mask)
            out[key].append(s)
            out["n" + key].append(n)
            if side == "chosen":
                out["ctok"].append((tok * mask).sum())
                out["ftok"].append(tok.sum())
                out["nf"].append(attn[:, 1:].sum())
    res = {k: np.concatenate(v) if k in ("c", "r", "nc", "nr") else float(np.sum(v)) for k, v in out.items()}
    res["nll"] = -res["ctok"] / res["nc"].sum()
    res["full_nll"] = -res["ftok"] / res["nf"]
    return res


def logsig(x):
    return -np.logaddexp(0.0, -x)


def _expected(kind, pol, ref=None, *, beta, loss_types=("sigmoid",), weights=(1.0,), nll_weight=1.0, gamma=1.0):
    if kind == "dpo":
        total = 0.0
        for t, w in zip(loss_types, weights):
            if t == "sft":
                total += w * pol["nll"]
                continue
            if t == "ipo":  # length-averaged log-probs
                z = (pol["c"] / pol["nc"] - ref["c"] / ref["nc"]) - (pol["r"] / pol["nr"] - ref["r"] / ref["nr"])
                total += w * np.mean((z - 1.0 / (2 * beta)) ** 2)
            else:
                z = (pol["c"] - ref["c"]) - (pol["r"] - ref["r"])
                per = -logsig(beta * z) if t == "sigmoid" else np.maximum(0.0, 1.0 - beta * z)
                total += w * np.mean(per)
        return total + nll_weight * pol["nll"]
    if kind == "cpo":
        return np.mean(-logsig(beta * (pol["c"] - pol["r"]))) + nll_weight * pol["nll"]
    ac, ar = pol["c"] / pol["nc"], pol["r"] / pol["nr"]
    if kind == "simpo":
        return np.mean(-logsig(beta * (ac - ar) - gamma)) + nll_weight * pol["nll"]
    assert kind == "orpo"
    log_odds = (ac - ar) - (np.log(-np.expm1(ac)) - np.log(-np.expm1(ar)))
    return np.mean(-beta * logsig(log_odds)) + pol["full_nll"]


def _first_step(env, **kw):
    tr = _trainer(env, **kw)
    batch = tr.algo.next_step_batch(tr)
    metrics = jax.device_get(tr.train_step(batch))
    return tr, batch, {k: float(v) for k, v in metrics.items()}


# ----- one step against the formula --------------------------------------------------------
CASES = {
    # DPO sigmoid + RPO against another model as reference, 2 accumulated micro-batches (the NLL is
    # a token mean over both)
    "dpo_sigmoid": (dict(rlhf_type="dpo", ref_model="REF", gradient_accumulation_steps=2),
                    dict(kind="dpo", beta=0.1, nll_weight=1.0)),
    # a weighted mixture: sigmoid, hinge, ipo (length-averaged log-probs) and sft (chosen NLL)
    "dpo_mix": (dict(rlhf_type="dpo", ref_model="REF", loss_type="sigmoid,hinge,ipo,sft",
                     loss_weights="0.7,0.3,0.2,0.5", rpo_alpha=0.0, beta=0.5),
                dict(kind="dpo", beta=0.5, loss_types=("sigmoid", "hinge", "ipo", "sft"),
                     weights=(0.7, 0.3, 0.2, 0.5), nll_weight=0.0)),
    "cpo": (dict(rlhf_type="cpo", cpo_alpha=0.5), dict(kind="cpo", beta=0.1, nll_weight=0.5)),
    "simpo": (dict(rlhf_type="simpo"), dict(kind="simpo", beta=2.0, gamma=1.0, nll_weight=1.0)),
    "orpo": (dict(rlhf_type="orpo", beta=0.2), dict(kind="orpo", beta=0.2)),
}
LEARN = dict(learning_rate=3e-3, weight_decay=0.0)  # irrelevant to the first (pre-update) loss
LEARN_STEPS = 12


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_loss_matches_formula_then_learns(env, case):
    """The first step's loss equals the formula on the initial model; further steps on the
    separable set (chosen always "yes", rejected "no") raise rewards/accuracies to >= 0.9."""
    flags, spec = CASES[case]
    flags = {k: (str(env["root"] / "ref") if v == "REF" else v) for k, v in flags.items()}
    tr, batch, m = _first_step(env, **flags, **LEARN)
    spec = dict(spec)
    kind = spec.pop("kind")
    # DPO's batches hold each prompt once (the default --shared_prefix); the others a sequence per reply
    assert ("input_ids" in batch) == (kind == "dpo")
    pol = _pair_logps(env["policy"], batch)
    ref = _pair_logps(env["ref"], batch) if kind == "dpo" else None
    want = _expected(kind, pol, ref, **spec)
    assert m["loss"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    # as TRL logs them: ORPO's NLL covers prompt and response; SimPO and ORPO log length-averaged log-probs
    assert m["nll_loss"] == pytest.approx(pol["full_nll" if kind == "orpo" else "nll"], rel=1e-5)
    averaged = kind in ("simpo", "orpo")
    logps_c, logps_r = (pol["c"] / pol["nc"], pol["r"] / pol["nr"]) if averaged else (pol["c"], pol["r"])
    assert m["logps/chosen"] == pytest.approx(np.mean(logps_c), rel=1e-5, abs=1e-5)
    assert m["logps/rejected"] == pytest.approx(np.mean(logps_r), rel=1e-5, abs=1e-5)
    if case == "dpo_sigmoid":
        cr = spec["beta"] * (pol["c"] - ref["c"])
        rr = spec["beta"] * (pol["r"] - ref["r"])
        assert m["rewards/chosen"] == pytest.approx(np.mean(cr), abs=1e-5)
        assert m["rewards/margins"] == pytest.approx(np.mean(cr - rr), abs=1e-5)
        assert m["rewards/accuracies"] == pytest.approx(np.mean(cr > rr), abs=1e-6)
        env["dpo_sigmoid_loss"] = m["loss"]
    if kind == "orpo":
        ac, ar = pol["c"] / pol["nc"], pol["r"] / pol["nr"]
        log_odds = (ac - ar) - (np.log(-np.expm1(ac)) - np.log(-np.expm1(ar)))
        assert m["log_odds_chosen"] == pytest.approx(np.mean(log_odds), abs=1e-5)
        assert m["log_odds_ratio"] == pytest.approx(np.mean(logsig(log_odds)), abs=1e-5)
    later = [jax.device_get(tr.train_step(tr.algo.next_step_batch(tr))) for _ in range(LEARN_STEPS)]
    accs = [float(x["rewards/accuracies"]) for x in later]
    assert min(accs[-2:]) >= 0.9, accs
    assert float(later[-1]["rewards/margins"]) > m["rewards/margins"]  # moved towards the chosen side


def test_shared_prefix_step_equals_a_sequence_per_reply(env):
    """--shared_prefix false runs chosen and rejected as sequences of their own; on the same rows (same seed) the
    default's two steps (2 accumulated micro-batches of different widths, re-laid to one shape) give every
    metric to float32 rounding."""
    # gradient checkpointing on, as users run it (this module's other tests turn it off)
    flags = dict(CASES["dpo_sigmoid"][0], ref_model=str(env["root"] / "ref"), gradient_checkpointing=True, **LEARN)
    shared, plain = _trainer(env, **flags), _trainer(env, **flags, shared_prefix=False)
    for _ in range(2):
        a, b = shared.algo.next_step_batch(shared), plain.algo.next_step_batch(plain)
        assert "input_ids" in a and "input_ids" not in b
        np.testing.assert_array_equal(per_reply_batch(a)["margin"], b["margin"])
        got, want = (jax.device_get(t.train_step(x)) for t, x in ((shared, a), (plain, b)))
        assert set(got) == set(want)
        for key in want:
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key


def test_precomputed_reference_gives_same_first_loss(env):
    """Same config as the dpo_sigmoid case (which computed the reference in the step)."""
    if "dpo_sigmoid_loss" not in env:  # run on its own: compute the on-the-fly reference loss here
        _, _, fly = _first_step(env, **dict(CASES["dpo_sigmoid"][0], ref_model=str(env["root"] / "ref")), **LEARN)
        env["dpo_sigmoid_loss"] = fly["loss"]
    flags = dict(CASES["dpo_sigmoid"][0], ref_model=str(env["root"] / "ref"), precompute_ref_log_probs=True)
    tr, batch, pre = _first_step(env, **flags, **LEARN)
    assert "ref_chosen_logps" in batch and tr.algo.extra() is None  # no reference params kept
    assert pre["loss"] == pytest.approx(env["dpo_sigmoid_loss"], rel=1e-5, abs=1e-6)


def test_dpo_rows_without_rejected_are_refused(env, tmp_path, capsys):
    rows = _rows(4)
    del rows[2]["rejected_response"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli_main(["rlhf", "--rlhf_type", "dpo", "--model", str(env["root"] / "policy"), "--dataset", str(bad),
                     "--output_dir", str(tmp_path / "out"), "--max_length", "32"])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert "bad.jsonl" in err[0] and "line 3" in err[0] and "rejected_response" in err[0]


def test_sharded_step_equals_single_device(env):
    """DPO with policy == reference (rpo_alpha 0): the first loss is log 2, on one device and on
    data=2,fsdp=2,tensor=2 (8 devices) with the same global micro-batch of 8 rows; the loss and
    the updated params agree."""
    common = dict(rlhf_type="dpo", rpo_alpha=0.0, learning_rate=1e-3)
    single = _trainer(env, mesh="data=1,fsdp=1,tensor=1", per_device_train_batch_size=8, **common)
    sharded = _trainer(env, mesh="data=2,fsdp=2,tensor=2", per_device_train_batch_size=2, **common)
    assert single.micro_batch == sharded.micro_batch == 8
    assert single.mesh.devices.size == 1 and sharded.mesh.devices.size == 8
    b1, b2 = single.algo.next_step_batch(single), sharded.algo.next_step_batch(sharded)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k])
    m1 = jax.device_get(single.train_step(b1))
    m2 = jax.device_get(sharded.train_step(b2))
    assert float(m1["loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
    assert float(m1["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
    # the reference forward differs from the policy's only in float32 rounding: no pair is a win (TRL logs 0)
    assert float(m1["rewards/accuracies"]) == 0.0 and float(m2["rewards/accuracies"]) == 0.0
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-5)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-4)
    assert float(m1["grad_norm"]) > 0
    p1 = jax.tree.leaves(jax.device_get(single.state.params))
    p2 = jax.tree.leaves(jax.device_get(sharded.state.params))
    assert len(p1) == len(p2)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


# ----- configs ----------------------------------------------------------------------------
CONFIG_EXPECT = {
    "dpo": dict(beta=0.1, loss_type="sigmoid", rpo_alpha=1.0),
    "kto": dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    "cpo": dict(beta=0.1, cpo_alpha=1.0, loss_type="sigmoid"),
    "orpo": dict(beta=0.1),
    "simpo": dict(beta=2.0, simpo_gamma=1.0, cpo_alpha=1.0),
    "rm": dict(),
    "grpo": dict(beta=0.04, num_generations=8, epsilon=0.2, loss_type="grpo", scale_rewards="group",
                 importance_sampling_level="token", num_iterations=1, temperature=0.9, max_completion_length=512),
    "ppo": dict(num_ppo_epochs=4, kl_coef=0.05, cliprange=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, temperature=0.9),
}


@pytest.mark.parametrize("name", list(CONFIG_EXPECT))
def test_config_files_load(name):
    file_cfg = load_config_file(ROOT / "configs" / f"{name}.py")
    cfg = resolve("rlhf", file_cfg, {"beta": 0.3} if name == "dpo" else {})
    assert cfg.rlhf_type == name
    assert cfg.learning_rate == pytest.approx(1e-5)
    for k, v in CONFIG_EXPECT[name].items():
        if name == "dpo" and k == "beta":
            v = 0.3  # the command line wins over the file
        assert cfg[k] == v, (k, cfg[k])
