"""PPO math (TRL PPOv2 formulas) against loops written out in plain Python."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import compute_gae, kl_penalty_rewards, ppo_policy_loss, ppo_value_loss, whiten


pytestmark = pytest.mark.usefixtures("x64")  # every test here computes in float64


MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],  # all-masked row
        [1, 0, 0, 0, 0, 0],
    ],
    dtype=np.float64,
)


def rand(shape, seed, scale=1.0):
    return np.random.RandomState(seed).normal(size=shape) * scale


def masked_mean_py(x, m):
    num = sum(x[b][t] * m[b][t] for b in range(len(m)) for t in range(len(m[0])))
    den = sum(m[b][t] for b in range(len(m)) for t in range(len(m[0])))
    return num / max(den, 1.0)


# ---------------------------------------------------------------- GAE
def ref_gae(rewards, values, mask, gamma, lam):
    B, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        r = [rewards[b][t] * mask[b][t] for t in range(T)]
        v = [values[b][t] * mask[b][t] for t in range(T)]
        last = 0.0
        for t in reversed(range(T)):
            nv = v[t + 1] if t < T - 1 else 0.0
            delta = r[t] + gamma * nv - v[t]
            last = delta + gamma * lam * last
            adv[b][t] = last * mask[b][t]
            ret[b][t] = (last + v[t]) * mask[b][t]
    return np.array(adv), np.array(ret)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae(gamma, lam):
    rewards, values = rand((4, 6), 0), rand((4, 6), 1)
    adv, ret = compute_gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(MASK), gamma=gamma, lam=lam)
    eadv, eret = ref_gae(rewards, values, MASK, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), eadv, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(ret), eret, rtol=1e-12, atol=1e-14)
    assert adv.dtype == jnp.float64 and np.all(np.asarray(adv)[2] == 0.0)


def test_gae_full_mask_is_trl_recursion():
    # With every position valid the result is exactly TRL's unmasked loop.
    rewards, values = rand((2, 5), 2), rand((2, 5), 3)
    adv, ret = compute_gae(jnp.asarray(rewards), jnp.asarray(values), jnp.ones((2, 5)))
    for b in range(2):
        last = 0.0
        for t in reversed(range(5)):
            nv = values[b][t + 1] if t < 4 else 0.0
            last = rewards[b][t] + 1.0 * nv - values[b][t] + 1.0 * 0.95 * last
            assert float(adv[b, t]) == pytest.approx(last, rel=1e-12, abs=1e-14)
            assert float(ret[b, t]) == pytest.approx(last + values[b][t], rel=1e-12, abs=1e-14)


def test_gae_grad_matches_finite_differences():
    rewards, values = rand((4, 6), 4), rand((4, 6), 5)
    w = rand((4, 6), 6)
    f = lambda r, v: jnp.sum(compute_gae(r, v, jnp.asarray(MASK), gamma=0.9, lam=0.8)[0] * w)  # noqa: E731
    gr, gv = jax.grad(f, argnums=(0, 1))(jnp.asarray(rewards), jnp.asarray(values))
    ref = lambda r, v: float(np.sum(ref_gae(r, v, MASK, 0.9, 0.8)[0] * w))  # noqa: E731
    h = 1e-6
    for b, t in [(0, 0), (0, 5), (1, 1), (3, 0), (2, 3)]:
        e = np.zeros((4, 6))
        e[b, t] = h
        assert float(gr[b, t]) == pytest.approx((ref(rewards + e, values) - ref(rewards - e, values)) / (2 * h), abs=1e-7)
        assert float(gv[b, t]) == pytest.approx((ref(rewards, values + e) - ref(rewards, values - e)) / (2 * h), abs=1e-7)


# ---------------------------------------------------------------- whitening
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    x = rand((4, 6), 7, scale=3.0) + 2.0
    out = whiten(jnp.asarray(x), jnp.asarray(MASK), shift_mean=shift_mean)
    vals = [x[b][t] for b in range(4) for t in range(6) if MASK[b][t]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)  # unbiased, as TRL's masked_var
    for b in range(4):
        for t in range(6):
            e = ((x[b][t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)) * MASK[b][t]
            assert float(out[b, t]) == pytest.approx(e, rel=1e-12, abs=1e-14)
    g = jax.grad(lambda y: jnp.sum(whiten(y, jnp.asarray(MASK)) ** 3))(jnp.asarray(x))
    h, v = 1e-6, rand((4, 6), 8)
    num = (float(jnp.sum(whiten(jnp.asarray(x + h * v), jnp.asarray(MASK)) ** 3))
           - float(jnp.sum(whiten(jnp.asarray(x - h * v), jnp.asarray(MASK)) ** 3))) / (2 * h)
    assert num == pytest.approx(float(jnp.sum(g * v)), rel=1e-6)


def test_whiten_all_masked_is_zero_not_nan():
    out = whiten(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    out = whiten(jnp.ones((2, 3)), jnp.asarray([[1.0, 0, 0], [0, 0, 0]]))  # one element
    assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------- policy loss
def ref_policy(logps, old, adv, mask, eps):
    B, T = len(mask), len(mask[0])
    pl, cf, kl = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            d = logps[b][t] - old[b][t]
            ratio = math.exp(d)
            a = adv[b][t]
            l1 = -a * ratio
            l2 = -a * min(max(ratio, 1 - eps), 1 + eps)
            pl[b][t] = max(l1, l2)
            cf[b][t] = 1.0 if l2 > l1 else 0.0
            kl[b][t] = d * d
    return masked_mean_py(pl, mask), masked_mean_py(cf, mask), 0.5 * masked_mean_py(kl, mask)


def policy_inputs():
    old = -np.abs(rand((4, 6), 9, 2.0))
    logps = old + rand((4, 6), 10, 0.3)
    adv = rand((4, 6), 11)
    logps[0, 1], adv[0, 1] = old[0, 1] + 100.0, 1.3   # huge ratio, A > 0: clipped
    logps[0, 2], adv[0, 2] = old[0, 2] + 100.0, -0.7  # huge ratio, A < 0: unclipped, huge loss
    logps[1, 0], adv[1, 0] = old[1, 0] - 100.0, -1.1  # tiny ratio, A < 0: clipped
    logps[1, 2], adv[1, 2] = old[1, 2] - 100.0, 0.9   # tiny ratio, A > 0
    adv[0, 3] = 0.0
    return logps, old, adv


@pytest.mark.parametrize("cliprange", [0.2, 0.05])
def test_policy_loss(cliprange):
    logps, old, adv = policy_inputs()
    loss, clipfrac, approx_kl = ppo_policy_loss(
        jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(MASK), cliprange=cliprange
    )
    eloss, ecf, ekl = ref_policy(logps, old, adv, MASK, cliprange)
    assert float(loss) == pytest.approx(eloss, rel=1e-12)
    assert float(clipfrac) == pytest.approx(ecf, rel=1e-12)
    assert float(approx_kl) == pytest.approx(ekl, rel=1e-12)

    # gradient w.r.t. logps against finite differences of the plain formula, element by element
    g = jax.grad(lambda x: ppo_policy_loss(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(MASK), cliprange=cliprange)[0])(jnp.asarray(logps))
    assert np.all(np.isfinite(np.asarray(g)))
    # The loss is a masked mean of per-token terms, so d loss / d logp[b, t] only involves token
    # (b, t): differentiate that token's term (the e^100 token would drown the others' differences).
    n = MASK.sum()
    for b in range(4):
        for t in range(6):
            h = 1e-6
            one = lambda x: ref_policy([[x]], [[old[b, t]]], [[adv[b, t]]], [[MASK[b, t]]], cliprange)[0] / n  # noqa: E731
            fd = (one(logps[b, t] + h) - one(logps[b, t] - h)) / (2 * h)
            assert float(g[b, t]) == pytest.approx(fd, rel=1e-5, abs=1e-12)
    # old log-probs are constants
    g_old = jax.grad(lambda o: ppo_policy_loss(jnp.asarray(logps), o, jnp.asarray(adv), jnp.asarray(MASK))[0])(jnp.asarray(old))
    np.testing.assert_array_equal(np.asarray(g_old), 0.0)


def test_policy_loss_float32_extreme_and_all_masked():
    logps, old, adv = policy_inputs()
    adv[0, 2] = 0.7  # keep the float32 loss representable (e^100 overflows float32 only when A < 0)
    with jax.enable_x64(False):
        args = [jnp.asarray(a, dtype=jnp.float32) for a in (logps, old, adv, MASK)]
        loss, cf, kl = ppo_policy_loss(*args)
        assert loss.dtype == cf.dtype == kl.dtype == jnp.float32
        g = jax.grad(lambda x: ppo_policy_loss(x, *args[1:])[0])(args[0])
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
        zero = jnp.zeros((4, 6), jnp.float32)
        out = ppo_policy_loss(*args[:3], zero)
        assert all(float(o) == 0.0 for o in out)
        g = jax.grad(lambda x: ppo_policy_loss(x, *args[1:3], zero)[0])(args[0])
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------- value loss
def ref_value(values, old, returns, mask, c):
    B, T = len(mask), len(mask[0])
    vl, cf = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            vc = min(max(values[b][t], old[b][t] - c), old[b][t] + c)
            l1 = (values[b][t] - returns[b][t]) ** 2
            l2 = (vc - returns[b][t]) ** 2
            vl[b][t] = max(l1, l2)
            cf[b][t] = 1.0 if l2 > l1 else 0.0
    return 0.5 * masked_mean_py(vl, mask), masked_mean_py(cf, mask)


@pytest.mark.parametrize("c", [0.2, 1.0])
def test_value_loss(c):
    old = rand((4, 6), 12)
    values = old + rand((4, 6), 13, 0.5)
    returns = rand((4, 6), 14)
    values[0, 0], returns[0, 0] = old[0, 0] + 100.0, -100.0
    loss, cf = ppo_value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), jnp.asarray(MASK), cliprange_value=c)
    eloss, ecf = ref_value(values, old, returns, MASK, c)
    assert float(loss) == pytest.approx(eloss, rel=1e-12)
    assert float(cf) == pytest.approx(ecf, rel=1e-12)
    g = jax.grad(lambda v: ppo_value_loss(v, jnp.asarray(old), jnp.asarray(returns), jnp.asarray(MASK), cliprange_value=c)[0])(jnp.asarray(values))
    for b in range(4):
        for t in range(6):
            h = 1e-4  # the loss is piecewise quadratic: central differences are exact up to rounding
            up, dn = values.copy(), values.copy()
            up[b, t] += h
            dn[b, t] -= h
            fd = (ref_value(up, old, returns, MASK, c)[0] - ref_value(dn, old, returns, MASK, c)[0]) / (2 * h)
            assert float(g[b, t]) == pytest.approx(fd, rel=1e-6, abs=1e-8)
    zero = jnp.zeros((4, 6))
    out = ppo_value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), zero)
    assert all(float(o) == 0.0 for o in out)


# ---------------------------------------------------------------- rewards with KL penalty
def test_kl_penalty_rewards():
    logps, ref = rand((4, 6), 15), rand((4, 6), 16)
    scores = np.array([1.5, -2.0, 3.0, 0.25])
    mask = MASK.copy()
    mask[0, 5] = 0.0  # row 0 ends at index 4
    out = kl_penalty_rewards(jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(scores), jnp.asarray(mask), kl_coef=0.1)
    last = {0: 4, 1: 2, 3: 0}  # row 2 has no response tokens: no score
    for b in range(4):
        for t in range(6):
            e = -0.1 * (logps[b][t] - ref[b][t]) * mask[b][t]
            if last.get(b) == t:
                e += scores[b]
            assert float(out[b, t]) == pytest.approx(e, rel=1e-12, abs=1e-15)
    out = kl_penalty_rewards(jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(scores), jnp.asarray(mask))
    assert float(out[1, 1]) == pytest.approx(-0.05 * (logps[1, 1] - ref[1, 1]), rel=1e-12)


def test_ppo_jit():
    logps, old, adv = policy_inputs()
    f = jax.jit(ppo_policy_loss, static_argnames=("cliprange",))
    out = f(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(MASK), cliprange=0.2)
    assert float(out[0]) == pytest.approx(ref_policy(logps, old, adv, MASK, 0.2)[0], rel=1e-12)
    g = jax.jit(compute_gae)(jnp.asarray(adv), jnp.asarray(old), jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(g[0]), ref_gae(adv, old, MASK, 1.0, 0.95)[0], rtol=1e-12, atol=1e-14)


def test_float32_in_float32_out_even_with_x64_enabled():
    x = jnp.asarray(rand((4, 6), 17), jnp.float32)
    m = jnp.asarray(MASK, jnp.float32)
    s = jnp.asarray([1.0, 2.0, 3.0, 4.0], jnp.float32)
    outs = [compute_gae(x, x, m), whiten(x, m), whiten(x, m, shift_mean=False), ppo_policy_loss(x, x, x, m),
            ppo_value_loss(x, x, x, m), kl_penalty_rewards(x, x, s, m)]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(outs)} == {jnp.dtype(jnp.float32)}


def test_bad_cliprange_raises_config_error():
    from jaxalign.errors import ConfigError

    x = jnp.zeros((1, 2))
    with pytest.raises(ConfigError, match="cliprange"):
        ppo_policy_loss(x, x, x, x, cliprange=1.5)
    with pytest.raises(ConfigError, match="cliprange_value"):
        ppo_value_loss(x, x, x, x, cliprange_value=-0.1)
