"""bco_pair's reward running mean: the weighted mean of all rewards seen so far (TRL's RunningMoments)."""

import types

import pytest

from jaxalign.trainers.preference import PairPreference


def _cfg(**kw):
    base = dict(rlhf_type="dpo", beta=0.1, loss_type="sigmoid,bco_pair", loss_weights="0.5,0.5", label_smoothing=0.0,
                rpo_alpha=0.0, reference_free=False, precompute_ref_log_probs=False, discopop_tau=0.05,
                cpo_alpha=1.0, simpo_gamma=1.0, shared_prefix=True)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_running_mean_is_the_mean_of_every_reward_seen():
    algo = PairPreference(_cfg())
    algo.rows_per_step = 4  # 4 pairs per step -> 8 rewards per step
    steps = [(0.5, -0.25), (1.0, 0.0), (-2.0, 0.5)]
    for chosen, rejected in steps:
        algo.after_step({"rewards/chosen": chosen, "rewards/rejected": rejected})
    # Every step contributes 4 chosen rewards with mean `chosen` and 4 rejected with mean `rejected`.
    all_rewards = []
    for chosen, rejected in steps:
        all_rewards += [chosen] * 4 + [rejected] * 4
    assert algo.bco_mean == pytest.approx(sum(all_rewards) / len(all_rewards), abs=1e-12)
    assert algo.bco_count == 24


def test_without_bco_pair_nothing_is_tracked():
    algo = PairPreference(_cfg(loss_type="sigmoid", loss_weights=None))
    algo.after_step({"rewards/chosen": 3.0, "rewards/rejected": 1.0})
    assert algo.bco_mean == 0.0 and not algo.uses_bco
