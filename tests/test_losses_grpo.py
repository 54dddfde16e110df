"""GRPO advantages and loss (all loss types, IS levels, clipping options) against plain-Python loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import ConfigError, JaxalignError
from jaxalign.losses import gdpo_advantages, group_advantages, grpo_loss


pytestmark = pytest.mark.usefixtures("x64")  # every test here computes in float64


# ---------------------------------------------------------------- group advantages
def ref_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ref_advantages(rewards, g, scale):
    out = []
    batch_std = ref_std(rewards)
    for k in range(0, len(rewards), g):
        grp = rewards[k:k + g]
        m = sum(grp) / g
        for x in grp:
            if scale == "group":
                out.append((x - m) / (ref_std(grp) + 1e-4))
            elif scale == "batch":
                out.append((x - m) / (batch_std + 1e-4))
            else:
                out.append(x - m)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    rewards = [1.0, 0.0, 0.5, 1.0, 2.0, -1.0, 0.25, 3.0, 0.7, 0.7, 0.7, 0.7]  # last group: zero variance
    adv = group_advantages(jnp.asarray(rewards), num_generations=4, scale_rewards=scale)
    assert adv.shape == (12,) and adv.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(adv), ref_advantages(rewards, 4, scale), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(adv)[8:], 0.0)


def test_group_advantages_default_is_group_and_float32():
    rewards = [3.0, 1.0, 2.0, 2.0, 5.0, 5.0]
    adv = group_advantages(jnp.asarray(rewards), num_generations=2)
    np.testing.assert_allclose(np.asarray(adv), ref_advantages(rewards, 2, "group"), rtol=1e-12)
    with jax.enable_x64(False):
        adv = group_advantages(jnp.asarray(rewards, dtype=jnp.float32), num_generations=3)
        assert adv.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(adv), ref_advantages(rewards, 3, "group"), rtol=1e-5)
        zero = group_advantages(jnp.full((8,), 0.3, jnp.float32), num_generations=4, scale_rewards="batch")
        np.testing.assert_array_equal(np.asarray(zero), 0.0)
    out = jax.jit(group_advantages, static_argnames=("num_generations", "scale_rewards"))(
        jnp.asarray(rewards), num_generations=3, scale_rewards="batch")
    # atol: the group [3, 1, 2] has mean 2 up to float64 rounding, so its middle advantage is 0 to ~1e-16
    np.testing.assert_allclose(np.asarray(out), ref_advantages(rewards, 3, "batch"), rtol=1e-12, atol=1e-15)


def test_group_advantages_errors():
    with pytest.raises(ConfigError, match="num_generations=4"):
        group_advantages(jnp.zeros(6), num_generations=4)
    with pytest.raises(ConfigError):
        group_advantages(jnp.zeros(6), num_generations=0)
    with pytest.raises(ConfigError, match="group, batch, none"):
        group_advantages(jnp.zeros(4), num_generations=2, scale_rewards="gdpo_typo")
    # a single completion per prompt has no spread: its centred advantage is 0, not NaN
    np.testing.assert_array_equal(np.asarray(group_advantages(jnp.arange(3.0), num_generations=1)), 0.0)


def test_gdpo_advantages_by_hand():
    nan = float("nan")
    # 2 groups of 3, 2 functions; the second function declines one row (NaN) and is flat in group 2
    r = [[1.0, 0.0], [3.0, 2.0], [2.0, nan], [0.5, 1.0], [0.0, 1.0], [2.5, 1.0]]
    w = [1.0, 0.5]

    def normalised(col, rows):
        vals = [r[i][col] for i in rows if not math.isnan(r[i][col])]
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        return [0.0 if math.isnan(r[i][col]) else (r[i][col] - m) / (sd + 1e-8) for i in rows]

    summed = [0.0] * 6
    for rows in ([0, 1, 2], [3, 4, 5]):
        for col in (0, 1):
            for i, v in zip(rows, normalised(col, rows)):
                summed[i] += w[col] * v
    mean = sum(summed) / 6
    sd = math.sqrt(sum((x - mean) ** 2 for x in summed) / 5)
    expected = [(x - mean) / (sd + 1e-8) for x in summed]
    out = gdpo_advantages(jnp.asarray(r), w, num_generations=3)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="one column per weight"):
        gdpo_advantages(jnp.zeros((6, 3)), w, num_generations=3)
    with pytest.raises(ConfigError, match="num_generations=4"):
        gdpo_advantages(jnp.zeros((6, 2)), w, num_generations=4)


# ---------------------------------------------------------------- GRPO loss reference
def ref_grpo(logps, old, ref, adv, mask, *, beta=0.04, eps=0.2, eps_high=None, delta=None,
             loss_type="grpo", level="token", max_len=None, frozen=None, tau_pos=1.0, tau_neg=1.05, ratio_logps=None):
    """Plain-Python GRPO loss and metrics. ``frozen`` = (seq_log_ratio per row, logps) held
    constant, to express GSPO-token's stop-gradients for finite differences; ``ratio_logps`` the
    log-probs CISPO's stop-gradient ratio is taken at (default ``logps``)."""
    B, T = len(mask), len(mask[0])
    eh = eps if eps_high is None else eps_high
    per_tok = [[0.0] * T for _ in range(B)]
    kl = [[0.0] * T for _ in range(B)]
    low = [[0.0] * T for _ in range(B)]
    high = [[0.0] * T for _ in range(B)]
    cispo_clipped = [[0.0] * T for _ in range(B)]
    rl = logps if ratio_logps is None else ratio_logps
    for b in range(B):
        n = sum(mask[b])
        seq = sum(mask[b][t] * (logps[b][t] - old[b][t]) for t in range(T)) / max(n, 1.0)
        seq0 = sum(mask[b][t] * (rl[b][t] - old[b][t]) for t in range(T)) / max(n, 1.0)
        a = adv[b]
        for t in range(T):
            if level == "token":
                w = logps[b][t] - old[b][t]
            elif level == "sequence":
                w = seq
            else:
                s, lp0 = frozen if frozen is not None else ([seq] * B, logps)
                w = s[b] + logps[b][t] - lp0[b][t]
            c1 = math.exp(w)
            c2 = min(max(c1, 1 - eps), 1 + eh)
            if delta is not None:
                c1 = min(c1, delta)
            per_tok[b][t] = -min(c1 * a, c2 * a)
            if loss_type == "cispo":  # the ratio, clipped at eps_high, is a constant weight on A logp
                rho0 = math.exp(rl[b][t] - old[b][t] if level == "token" else seq0)
                per_tok[b][t] = -min(rho0, eh) * a * logps[b][t]
                cispo_clipped[b][t] = 1.0 if (rho0 > eh and a > 0) else 0.0
            elif loss_type == "sapo":  # soft gate sigmoid(tau (rho - 1)) 4 / tau instead of the clip
                tau = tau_pos if a > 0 else tau_neg
                per_tok[b][t] = -(1.0 / (1.0 + math.exp(-tau * (math.exp(w) - 1.0)))) * 4.0 / tau * a
            if ref is not None:
                d = min(max(ref[b][t] - logps[b][t], -20.0), 20.0)
                kl[b][t] = min(max(math.exp(d) - d - 1, -10.0), 10.0)
                per_tok[b][t] += beta * kl[b][t]
            low[b][t] = 1.0 if (c1 < 1 - eps and a < 0) else 0.0
            high[b][t] = 1.0 if (c1 > 1 + eh and a > 0) else 0.0
    total = sum(mask[b][t] for b in range(B) for t in range(T))
    msum = sum(per_tok[b][t] * mask[b][t] for b in range(B) for t in range(T))
    if loss_type in ("grpo", "sapo"):
        loss = sum(sum(per_tok[b][t] * mask[b][t] for t in range(T)) / max(sum(mask[b]), 1.0) for b in range(B)) / B
    elif loss_type in ("bnpo", "dapo", "cispo"):
        loss = msum / max(total, 1.0)
    else:
        loss = msum / (B * (T if max_len is None else max_len))

    def tmean(x):
        return sum(x[b][t] * mask[b][t] for b in range(B) for t in range(T)) / max(total, 1.0)

    region = [[max(low[b][t], high[b][t]) for t in range(T)] for b in range(B)]
    metrics = {"kl": tmean(kl), "clip_ratio/low_mean": tmean(low),
               "clip_ratio/high_mean": tmean(high), "clip_ratio/region_mean": tmean(region)}
    if loss_type == "cispo":
        metrics = {"kl": tmean(kl), "cispo_clip_ratio": tmean(cispo_clipped)}
    elif loss_type == "sapo":
        metrics = {"kl": tmean(kl)}
    return loss, metrics


MASK = np.array(
    [
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],  # all-masked row
        [1, 1, 1, 0, 0, 0],
    ],
    dtype=np.float64,
)


def inputs(seed=0):
    rng = np.random.RandomState(seed)
    old = -rng.uniform(0.1, 4.0, size=(5, 6))
    logps = old + rng.normal(scale=0.25, size=(5, 6))
    ref = logps + rng.normal(scale=0.5, size=(5, 6))
    adv = np.array([1.2, -0.8, 0.5, 0.3, -1.5])
    # extreme gaps: clipped-high token with A > 0, vanishing ratio with A > 0, clipped-low with A < 0
    logps[0, 1] = old[0, 1] + 100.0
    logps[0, 2] = old[0, 2] - 100.0
    logps[1, 3] = old[1, 3] - 100.0
    logps[4, 0] = old[4, 0] + 0.3
    logps[1, 4] = old[1, 4] + 1.0  # ratio e > delta with A < 0: two-sided clipping bites
    # KL clamps: reference far above / below the policy
    ref[1, 0] = logps[1, 0] + 100.0
    ref[2, 1] = logps[2, 1] - 100.0
    ref[4, 2] = logps[4, 2] - 15.0
    return logps, old, ref, adv


CONFIGS = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dapo", eps_high=0.28),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dr_grpo", max_len=16),
    dict(loss_type="grpo", delta=1.5, beta=0.1),
    dict(loss_type="bnpo", beta=0.0),
    dict(loss_type="grpo", level="sequence", eps=3e-4, eps_high=4e-4, beta=0.0),
    dict(loss_type="bnpo", level="sequence", eps=0.2),
    dict(loss_type="grpo", level="sequence_token", eps=0.2, eps_high=0.3),
    dict(loss_type="cispo", eps_high=5.0),
    dict(loss_type="cispo", beta=0.0),  # epsilon_high defaults to epsilon, as in TRL and ms-swift
    dict(loss_type="cispo", level="sequence", eps_high=1.1),
    dict(loss_type="sapo"),
    dict(loss_type="sapo", beta=0.0, tau_pos=0.5, tau_neg=2.0),
]


def call(logps, old, ref, adv, mask, c):
    return grpo_loss(
        logps, old, ref, adv, mask,
        beta=c.get("beta", 0.04), epsilon=c.get("eps", 0.2), epsilon_high=c.get("eps_high"),
        delta=c.get("delta"), loss_type=c["loss_type"],
        importance_sampling_level=c.get("level", "token"), max_completion_length=c.get("max_len"),
        tau_pos=c.get("tau_pos", 1.0), tau_neg=c.get("tau_neg", 1.05),
    )


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_loss_value_metrics_and_grad(cfg):
    logps, old, ref, adv = inputs()
    ref_arg = None if cfg.get("beta", 0.04) == 0 else ref
    J = jnp.asarray
    loss, metrics = call(J(logps), J(old), None if ref_arg is None else J(ref), J(adv), J(MASK), cfg)
    assert loss.shape == () and loss.dtype == jnp.float64
    kw = dict(beta=cfg.get("beta", 0.04), eps=cfg.get("eps", 0.2), eps_high=cfg.get("eps_high"),
              delta=cfg.get("delta"), loss_type=cfg["loss_type"], level=cfg.get("level", "token"),
              max_len=cfg.get("max_len"), tau_pos=cfg.get("tau_pos", 1.0), tau_neg=cfg.get("tau_neg", 1.05))
    eloss, emetrics = ref_grpo(logps, old, ref_arg, adv, MASK, **kw)
    assert float(loss) == pytest.approx(eloss, rel=1e-10, abs=1e-14)
    assert set(metrics) == set(emetrics)
    for k, v in emetrics.items():
        assert float(metrics[k]) == pytest.approx(v, rel=1e-10, abs=1e-14), k

    # gradient w.r.t. logps against central differences of the plain formula
    g = jax.grad(lambda x: call(x, J(old), None if ref_arg is None else J(ref), J(adv), J(MASK), cfg)[0])(J(logps))
    assert np.all(np.isfinite(np.asarray(g)))
    frozen = None
    if kw["level"] == "sequence_token":
        seq = [sum(MASK[b][t] * (logps[b][t] - old[b][t]) for t in range(6)) / max(MASK[b].sum(), 1.0) for b in range(5)]
        frozen = (seq, logps.copy())
    if cfg["loss_type"] == "cispo":
        kw["ratio_logps"] = logps.copy()
    h = 1e-6
    for b in range(5):
        for t in range(6):
            up, dn = logps.copy(), logps.copy()
            up[b, t] += h
            dn[b, t] -= h
            fd = (ref_grpo(up, old, ref_arg, adv, MASK, frozen=frozen, **kw)[0]
                  - ref_grpo(dn, old, ref_arg, adv, MASK, frozen=frozen, **kw)[0]) / (2 * h)
            assert float(g[b, t]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (b, t)
    # old, reference log-probs and advantages are constants
    go = jax.grad(lambda o, a: call(J(logps), o, None if ref_arg is None else J(ref), a, J(MASK), cfg)[0],
                  argnums=(0, 1))(J(old), J(adv))
    assert all(np.all(np.asarray(x) == 0.0) for x in go)


def test_grpo_delta_caps_the_ratio_for_negative_advantages():
    logps, old, ref, adv = inputs()
    J = jnp.asarray
    a = grpo_loss(J(logps), J(old), J(ref), J(adv), J(MASK))[0]
    b = grpo_loss(J(logps), J(old), J(ref), J(adv), J(MASK), delta=1.5)[0]
    # only token (1, 4) changes: -A * e^1 becomes -A * 1.5, weighted 1 / (B * n_row) for grpo
    assert float(a) - float(b) == pytest.approx(0.8 * (math.e - 1.5) / (5 * 6), rel=1e-10)


def test_grpo_huge_ratio_with_negative_or_zero_advantage():
    logps, old, ref, _ = inputs()
    logps[0, 3] = old[0, 3] + 100.0
    adv = np.array([-0.5, 0.0, 0.0, 0.0, 0.0])  # row 0 negative; rows 1.. zero-variance groups
    loss, _ = grpo_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(MASK))
    eloss, _ = ref_grpo(logps, old, ref, adv, MASK)
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(eloss, rel=1e-10)  # ~ 0.5 e^100 / (5 * 5)
    with jax.enable_x64(False):
        # float32: e^100 overflows, but A == 0 tokens must give 0, never 0 * inf = NaN
        args = [jnp.asarray(a, jnp.float32) for a in (logps, old, ref, np.zeros(5), MASK)]
        loss, metrics = grpo_loss(*args)
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
        g = jax.grad(lambda x: grpo_loss(x, *args[1:])[0])(args[0])
        assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))
        assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_grpo_all_masked_and_on_policy():
    logps, old, ref, adv = inputs()
    zero = jnp.zeros((5, 6))
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            loss, metrics = grpo_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), zero,
                                      loss_type=lt, importance_sampling_level=level)
            assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
            g = jax.grad(lambda x: grpo_loss(x, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), zero,
                                             loss_type=lt, importance_sampling_level=level)[0])(jnp.asarray(logps))
            np.testing.assert_array_equal(np.asarray(g), 0.0)
    # on-policy (old_logps None): ratio 1, loss = -mean A + beta KL; gradient of the PG term is -A per token
    loss, metrics = grpo_loss(jnp.asarray(logps), None, None, jnp.asarray(adv), jnp.asarray(MASK), beta=0.0)
    eloss, _ = ref_grpo(logps, logps, None, adv, MASK, beta=0.0)
    assert float(loss) == pytest.approx(eloss, rel=1e-12)
    assert float(metrics["kl"]) == 0.0 and float(metrics["clip_ratio/region_mean"]) == 0.0
    g = jax.grad(lambda x: grpo_loss(x, None, None, jnp.asarray(adv), jnp.asarray(MASK), beta=0.0)[0])(jnp.asarray(logps))
    n = np.maximum(MASK.sum(1), 1.0)
    np.testing.assert_allclose(np.asarray(g), -(adv / n)[:, None] * MASK / 5, rtol=1e-12)


def test_grpo_per_token_advantages_broadcast():
    logps, old, ref, adv = inputs()
    a = grpo_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(MASK))[0]
    b = grpo_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(ref),
                  jnp.asarray(np.repeat(adv[:, None], 6, axis=1)), jnp.asarray(MASK))[0]
    assert float(a) == float(b)


def test_grpo_errors():
    x = jnp.zeros((2, 3))
    a = jnp.zeros(2)
    with pytest.raises(JaxalignError) as info:
        grpo_loss(x, x, x, a, x, loss_type="ppo")
    assert isinstance(info.value, ConfigError)
    for name in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="token, sequence"):
        grpo_loss(x, x, x, a, x, importance_sampling_level="seq")
    with pytest.raises(ConfigError, match="ref_logps"):
        grpo_loss(x, x, None, a, x, beta=0.04)
    with pytest.raises(ConfigError, match="epsilon"):
        grpo_loss(x, x, x, a, x, epsilon=1.0)
    with pytest.raises(ConfigError, match="delta"):
        grpo_loss(x, x, x, a, x, delta=0.0)


def test_grpo_jit_static_options():
    logps, old, ref, adv = inputs()
    f = jax.jit(grpo_loss, static_argnames=("loss_type", "importance_sampling_level", "epsilon_high", "beta"))
    loss, metrics = f(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(MASK),
                      loss_type="dapo", epsilon_high=0.28, importance_sampling_level="sequence")
    eloss, em = ref_grpo(logps, old, ref, adv, MASK, loss_type="dapo", eps_high=0.28, level="sequence")
    assert float(loss) == pytest.approx(eloss, rel=1e-10)
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(em["clip_ratio/high_mean"], rel=1e-12)
