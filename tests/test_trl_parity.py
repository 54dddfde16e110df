"""One step of jaxalign next to one step of TRL's own trainer of the same algorithm (TRL runs in the test).

Same tiny policy, a *different* reference model (so rewards are not trivially 0), the same rows in the
same batch order. First the token ids and loss masks of every sequence are asserted identical, then the
loss, the gradient norm and every metric both sides log agree to 1e-4 relative (1e-6 absolute near 0).
The documented differences (README, "Where jaxalign differs") are kept out of reach: no label smoothing
on sigmoid DPO, unpadded batches for CPO/SimPO/ORPO's ``logits/*``, a template without text after the
end-of-turn token.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

import trl_side as trl  # noqa: E402
from helpers import config, per_reply_batch, write_jsonl  # noqa: E402
from jaxalign.trainers.run import build_trainer  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6
BATCH = 4
LR = 1e-3
MAX_LENGTH = 64
DPO_BUCKETS = "8,16,32,64"  # DPO's default shared-prefix rows need prompt and reply buckets finer than the sequence

# jaxalign name -> TRL name where the two differ (TRL's RewardTrainer logs `margin`; ms-swift and
# jaxalign log `rewards/margins` for the same number).
RENAMED = {"rm": {"rewards/margins": "margin"}}

# What each case must at least compare, so that a renamed or dropped metric cannot pass unnoticed.
PAIR_METRICS = {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
EXPECTED = {
    "dpo": PAIR_METRICS,
    "cpo": PAIR_METRICS | {"nll_loss"},
    "orpo": PAIR_METRICS | {"nll_loss", "log_odds_ratio", "log_odds_chosen"},
    "kto": {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "kl"},
    "rm": {"loss", "grad_norm", "learning_rate", "accuracy", "rewards/margins"},
}

# case -> (jaxalign flags, TRL builder name, TRL hyperparameters, rows)
CASES = {
    "dpo_sigmoid": (dict(rlhf_type="dpo", loss_type="sigmoid", rpo_alpha=0.0, beta=0.1),
                    "dpo", dict(loss_type=["sigmoid"], beta=0.1), "pairs"),
    "dpo_sigmoid_sft": (dict(rlhf_type="dpo", loss_type="sigmoid", rpo_alpha=0.5, beta=0.1),
                        "dpo", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1), "pairs"),
    "dpo_ipo": (dict(rlhf_type="dpo", loss_type="ipo", rpo_alpha=0.0, beta=0.1),
                "dpo", dict(loss_type=["ipo"], beta=0.1), "pairs"),
    "dpo_hinge": (dict(rlhf_type="dpo", loss_type="hinge", rpo_alpha=0.0, beta=0.1),
                  "dpo", dict(loss_type=["hinge"], beta=0.1), "pairs"),
    "dpo_robust": (dict(rlhf_type="dpo", loss_type="robust", rpo_alpha=0.0, beta=0.1, label_smoothing=0.2),
                   "dpo", dict(loss_type=["robust"], beta=0.1, label_smoothing=0.2), "pairs"),
    "cpo": (dict(rlhf_type="cpo", beta=0.1, cpo_alpha=0.7),
            "cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=0.7), "equal_pairs"),
    "cpo_simpo": (dict(rlhf_type="cpo", loss_type="simpo", beta=0.5, simpo_gamma=0.3, cpo_alpha=0.7),
                  "cpo", dict(loss_type="simpo", beta=0.5, simpo_gamma=0.3, cpo_alpha=0.7), "equal_pairs"),
    "simpo": (dict(rlhf_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0),
              "cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0), "equal_pairs"),
    "orpo": (dict(rlhf_type="orpo", beta=0.2), "orpo", dict(beta=0.2), "equal_pairs"),
    "kto": (dict(rlhf_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5),
            "kto", dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5), "kto"),
    "kto_apo_zero_unpaired": (dict(rlhf_type="kto", loss_type="apo_zero_unpaired", beta=0.1, desirable_weight=1.0,
                                   undesirable_weight=1.5),
                              "kto", dict(loss_type="apo_zero_unpaired", beta=0.1, desirable_weight=1.0,
                                          undesirable_weight=1.5), "kto"),
    "rm": (dict(rlhf_type="rm"), "rm", dict(), "pairs"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_parity")
    policy = trl.model_folder(root / "policy", seed=0)
    ref = trl.model_folder(root / "ref", seed=1)
    rm, head = trl.reward_model_folder(policy, root / "rm", seed=2)
    rows = {"pairs": trl.pair_rows(BATCH), "equal_pairs": trl.equal_length_pair_rows(BATCH), "kto": trl.kto_rows(BATCH)}
    return dict(root=root, policy=policy, ref=ref, rm=rm, head=head, rows=rows)


def jaxalign_step(world, case: str, flags: dict, rows: list[dict]):
    """(jaxalign's micro-batch, its metrics, the rows in that batch's order) for one optimizer step."""
    root = world["root"]
    kind = flags["rlhf_type"]
    model = world["rm"] if kind == "rm" else world["policy"]
    extra = {"ref_model": str(world["ref"])} if kind in ("dpo", "kto") else {}
    cfg = config(model, write_jsonl(root / f"{case}.jsonl", rows), root / f"out_{case}", **flags, **extra,
                 per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_steps=1, learning_rate=LR,
                 max_length=MAX_LENGTH, length_buckets=DPO_BUCKETS if kind == "dpo" else str(MAX_LENGTH),
                 save_hf=False, seed=0)
    tr = build_trainer(cfg, quiet=True)
    order = [int(i) for i in tr.batches.epoch_plan(0)[0]]
    micros = tr.algo.next_batch(tr)
    assert len(micros) == 1
    if kind == "dpo":  # each prompt once, then chosen and rejected (the default)
        assert "input_ids" in micros[0] and "chosen_input_ids" not in micros[0]
    metrics = tr.step_on(micros)
    return micros[0], metrics, [rows[i] for i in order]


def trl_step(world, case: str, builder: str, hp: dict, rows: list[dict]):
    args = trl.training_args(world["root"] / f"trl_{case}", BATCH, learning_rate=LR, max_length=MAX_LENGTH)
    if builder == "dpo":
        trainer = trl.dpo_trainer(world["policy"], world["ref"], rows, args, **hp)
    elif builder == "kto":
        trainer = trl.kto_trainer(world["policy"], world["ref"], rows, args, **hp)
    elif builder == "rm":
        trainer = trl.reward_trainer(world["rm"], world["head"], rows, args, **hp)
    else:
        trainer = getattr(trl, f"{builder}_trainer")(world["policy"], rows, args, **hp)
    return trl.run_one_step(trainer)


def assert_same_sequences(kind: str, ours: dict, theirs: dict, kl_pairs: bool = True) -> None:
    if kind == "kto":  # apo_zero_unpaired: TRL builds no KL pairs (jaxalign builds them but does not score them)
        for prefix, trl_prefix in (("", ""), ("kl_", "KL_"))[:2 if kl_pairs else 1]:
            assert trl.sequences(ours[f"{prefix}input_ids"], ours[f"{prefix}attention_mask"],
                                 ours[f"{prefix}loss_mask"]) == trl.sequences(
                theirs[f"{trl_prefix}input_ids"], theirs[f"{trl_prefix}attention_mask"],
                theirs[f"{trl_prefix}completion_mask"]), f"{prefix or 'main'} sequences differ"
        assert ours["label"].tolist() == theirs["label"].astype(bool).tolist()
    elif kind == "rm":
        mine = [s for side in ("chosen", "rejected")
                for s in trl.sequences(ours[f"{side}_input_ids"], ours[f"{side}_attention_mask"])]
        assert mine == trl.sequences(theirs["input_ids"], theirs["attention_mask"])
    else:
        assert trl.jaxalign_pair_sequences(ours) == trl.trl_pair_sequences("dpo" if kind == "dpo" else "pair", theirs)


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), ATOL / RTOL)


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_matches_trl(world, case):
    flags, builder, hp, rows_key = CASES[case]
    kind = flags["rlhf_type"]
    kind = "cpo" if kind == "simpo" else kind
    ours_batch, ours, ordered = jaxalign_step(world, case, flags, world["rows"][rows_key])
    theirs_batch, theirs = trl_step(world, case, builder, hp, ordered)
    assert_same_sequences(kind, per_reply_batch(ours_batch), theirs_batch,
                          kl_pairs=flags.get("loss_type") != "apo_zero_unpaired")

    renamed = RENAMED.get(kind, {})
    compared = {name: renamed.get(name, name) for name in ours if renamed.get(name, name) in theirs}
    assert EXPECTED[kind] <= set(compared), f"not compared: {sorted(EXPECTED[kind] - set(compared))}"
    gaps = {name: relative_gap(ours[name], theirs[trl_name]) for name, trl_name in compared.items()}
    print(f"\n{case}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(gaps.items())))
    for name, trl_name in compared.items():
        assert math.isclose(ours[name], theirs[trl_name], rel_tol=RTOL, abs_tol=ATOL), (
            f"{name}: jaxalign {ours[name]!r}, TRL {theirs[trl_name]!r}")
    assert ours["loss"] > 0 and ours["grad_norm"] > 0
    if kind in ("dpo", "kto"):  # the reference differs from the policy, so the rewards are not 0
        assert abs(ours["rewards/chosen"]) > 1e-3 and abs(ours["rewards/rejected"]) > 1e-3
