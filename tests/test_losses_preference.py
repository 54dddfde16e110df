"""DPO (all loss types), CPO, SimPO, ORPO and KTO against formulas written out in plain Python."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.errors import ConfigError, JaxalignError
from jaxalign.losses import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


pytestmark = pytest.mark.usefixtures("x64")  # every test here computes in float64


# ---------------------------------------------------------------- plain-Python references
def logsig(x):
    """log(1 / (1 + e^-x)), written to avoid overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def ref_dpo(c, r, rc, rr, *, beta, loss_type, ls=0.0, tau=0.05, delta=0.0, reference_free=False):
    """Per-example DPO losses from the papers / TRL's dpo_loss, one Python float at a time."""
    n = len(c)
    if reference_free:
        rc = [0.0] * n
        rr = [0.0] * n
    lrc = [c[i] - rc[i] for i in range(n)]
    lrr = [r[i] - rr[i] for i in range(n)]
    z = [lrc[i] - lrr[i] for i in range(n)]
    out = []
    if loss_type in ("aot", "aot_pair"):
        if loss_type == "aot":
            a = sorted(c[i] - r[i] for i in range(n))
            b = sorted(rc[i] - rr[i] for i in range(n))
        else:
            a = sorted(lrc)
            b = sorted(lrr)
        for i in range(n):
            d = beta * (a[i] - b[i])
            out.append(-(1 - ls) * logsig(d) - ls * logsig(-d))
        return out
    for i in range(n):
        y = beta * z[i]
        if loss_type == "sigmoid":
            v = -(1 - ls) * logsig(y) - ls * logsig(-y)
        elif loss_type == "robust":
            v = (-(1 - ls) * logsig(y) + ls * logsig(-y)) / (1 - 2 * ls)
        elif loss_type == "exo_pair":
            e = ls if ls else 1e-3
            v = sig(y) * (logsig(y) - math.log(1 - e)) + sig(-y) * (logsig(-y) - math.log(e))
        elif loss_type == "hinge":
            v = max(0.0, 1 - y)
        elif loss_type == "ipo":
            v = (z[i] - 1 / (2 * beta)) ** 2
        elif loss_type == "bco_pair":
            v = -logsig(beta * lrc[i] - delta) - logsig(-(beta * lrr[i] - delta))
        elif loss_type == "sppo_hard":
            v = (lrc[i] - 0.5 / beta) ** 2 + (lrr[i] + 0.5 / beta) ** 2
        elif loss_type == "nca_pair":
            v = -logsig(beta * lrc[i]) - 0.5 * logsig(-beta * lrc[i]) - 0.5 * logsig(-beta * lrr[i])
        elif loss_type == "apo_zero":
            v = (1 - sig(beta * lrc[i])) + sig(beta * lrr[i])
        elif loss_type == "apo_down":
            v = sig(beta * lrc[i]) + (1 - sig(beta * (lrc[i] - lrr[i])))
        elif loss_type == "discopop":
            m = sig(y / tau)
            # exp(-y) * m: for very negative y, m underflows to 0 first; write it as a product
            # of the two factors only where it is representable.
            expo = math.exp(-y) * m if -y < 700 else 0.0
            v = -logsig(y) * (1 - m) + expo
        else:
            raise AssertionError(loss_type)
        out.append(v)
    return out


def fd_grads(fn, arrays, h=1e-6):
    """Central finite differences of the scalar ``fn(*arrays)`` w.r.t. every element."""
    grads = []
    for k, a in enumerate(arrays):
        g = np.zeros(len(a))
        for i in range(len(a)):
            up = [list(x) for x in arrays]
            dn = [list(x) for x in arrays]
            up[k][i] += h
            dn[k][i] -= h
            g[i] = (fn(*up) - fn(*dn)) / (2 * h)
        grads.append(g)
    return grads


def directional_check(f, args, h=1e-6, rtol=1e-5, atol=1e-8, seed=0):
    """jax.grad(f) . v against the implementation's own central difference along v."""
    rng = np.random.RandomState(seed)
    grads = jax.grad(f, argnums=tuple(range(len(args))))(*args)
    vs = [rng.normal(size=np.shape(a)) for a in args]
    analytic = sum(float(np.sum(np.asarray(g) * v)) for g, v in zip(grads, vs))
    up = f(*[a + h * v for a, v in zip(args, vs)])
    dn = f(*[a - h * v for a, v in zip(args, vs)])
    numeric = (float(up) - float(dn)) / (2 * h)
    assert math.isfinite(analytic)
    assert numeric == pytest.approx(analytic, rel=rtol, abs=atol)


def batch(seed=0, extreme=True):
    """Random sequence log-probs; with ``extreme`` rows whose log-ratio gap is +-100."""
    rng = np.random.RandomState(seed)
    c = -rng.uniform(5, 60, size=4)
    r = -rng.uniform(5, 60, size=4)
    rc = -rng.uniform(5, 60, size=4)
    rr = -rng.uniform(5, 60, size=4)
    if extreme:
        # z = +100, -100 and ~+200; single-side log-ratios reach +-100 (no ties, for the sorts).
        c = np.concatenate([c, [-10.0, -110.0, -3.5]])
        r = np.concatenate([r, [-110.0, -10.0, -103.0]])
        rc = np.concatenate([rc, [-60.0, -61.0, -103.0]])
        rr = np.concatenate([rr, [-60.0, -59.5, -3.0]])
    return c, r, rc, rr


ALL_DPO = DPO_LOSS_TYPES + ("aot_unpaired",)


# ---------------------------------------------------------------- DPO
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", ALL_DPO)
def test_dpo_values_rewards_and_grads(loss_type, beta):
    ref_type = "aot_pair" if loss_type == "aot_unpaired" else loss_type
    ls = 0.1 if ref_type in ("sigmoid", "robust", "exo_pair", "aot", "aot_pair") else 0.0
    delta = 0.3 if ref_type == "bco_pair" else 0.0
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=ls, bco_delta=delta)
    c, r, rc, rr = batch(seed=1)
    losses, cr, rj = dpo_loss(*map(jnp.asarray, (c, r, rc, rr)), **kw)
    assert losses.dtype == jnp.float64 and losses.shape == c.shape
    expected = ref_dpo(c, r, rc, rr, beta=beta, loss_type=ref_type, ls=ls, delta=delta)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-10, atol=1e-12)
    assert np.all(np.isfinite(np.asarray(losses)))
    np.testing.assert_allclose(np.asarray(cr), beta * (c - rc), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(rj), beta * (r - rr), rtol=1e-12)

    # Gradients of sum(losses) w.r.t. all four inputs against finite differences of the
    # independent formula (including the +-100 rows).
    def total(*xs):
        return jnp.sum(dpo_loss(*xs, **kw)[0])

    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (c, r, rc, rr)))
    ref_grads = fd_grads(
        lambda *xs: sum(ref_dpo(*xs, beta=beta, loss_type=ref_type, ls=ls, delta=delta)),
        [c.tolist(), r.tolist(), rc.tolist(), rr.tolist()],
    )
    for g, rg in zip(grads, ref_grads):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-5, atol=1e-6)
    if beta == 0.1:  # the implementation's own finite differences (once per loss type)
        directional_check(total, list(map(jnp.asarray, (c, r, rc, rr))))


def test_dpo_rewards_are_stop_gradient():
    c, r, rc, rr = map(jnp.asarray, batch(seed=2, extreme=False))
    g = jax.grad(lambda x: jnp.sum(dpo_loss(x, r, rc, rr)[1]))(c)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_dpo_policy_equals_reference_is_log2():
    rng = np.random.RandomState(3)
    c = jnp.asarray(-rng.uniform(1, 200, size=6))
    r = jnp.asarray(-rng.uniform(1, 200, size=6))
    for beta in (0.01, 0.1, 0.5, 5.0):
        losses, cr, rj = dpo_loss(c, r, c, r, beta=beta)
        np.testing.assert_array_equal(np.asarray(losses), math.log(2.0))
        np.testing.assert_array_equal(np.asarray(cr), 0.0)
        np.testing.assert_array_equal(np.asarray(rj), 0.0)
    with jax.enable_x64(False):
        c32 = jnp.asarray(np.asarray(c), dtype=jnp.float32)
        r32 = jnp.asarray(np.asarray(r), dtype=jnp.float32)
        losses = dpo_loss(c32, r32, c32, r32)[0]
        assert losses.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(losses), np.float32(math.log(2.0)))


def test_dpo_reference_free():
    c, r, rc, rr = batch(seed=4, extreme=False)
    losses, cr, rj = dpo_loss(*map(jnp.asarray, (c, r, rc, rr)), beta=0.1, reference_free=True)
    np.testing.assert_allclose(
        np.asarray(losses), ref_dpo(c, r, rc, rr, beta=0.1, loss_type="sigmoid", reference_free=True),
        rtol=1e-12,
    )
    np.testing.assert_allclose(np.asarray(cr), 0.1 * c, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(rj), 0.1 * r, rtol=1e-12)


def test_dpo_discopop_tau_and_exo_explicit_smoothing():
    c, r, rc, rr = batch(seed=5)
    args = tuple(map(jnp.asarray, (c, r, rc, rr)))
    got = dpo_loss(*args, beta=0.5, loss_type="discopop", discopop_tau=0.3)[0]
    np.testing.assert_allclose(
        np.asarray(got), ref_dpo(c, r, rc, rr, beta=0.5, loss_type="discopop", tau=0.3), rtol=1e-10
    )
    # exo_pair with ls == 0 uses 1e-3, i.e. the same as passing 1e-3 explicitly.
    a = dpo_loss(*args, loss_type="exo_pair")[0]
    b = dpo_loss(*args, loss_type="exo_pair", label_smoothing=1e-3)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dpo_bco_delta_is_constant():
    c, r, rc, rr = map(jnp.asarray, batch(seed=6, extreme=False))
    g = jax.grad(lambda d: jnp.sum(dpo_loss(c, r, rc, rr, loss_type="bco_pair", bco_delta=d)[0]))(0.2)
    assert float(g) == 0.0


def test_dpo_unknown_loss_type_lists_valid_types():
    x = jnp.zeros(2)
    with pytest.raises(JaxalignError) as info:
        dpo_loss(x, x, x, x, loss_type="kto_pair")
    assert isinstance(info.value, ConfigError)
    for name in DPO_LOSS_TYPES:
        assert name in str(info.value)


def test_dpo_jit_float32_dtype_and_static_loss_type():
    f = jax.jit(dpo_loss, static_argnames=("loss_type", "beta", "label_smoothing"))
    for loss_type in ("sigmoid", "discopop", "aot"):
        with jax.enable_x64(False):
            c, r, rc, rr = (jnp.asarray(a, dtype=jnp.float32) for a in batch(seed=7))
            out = f(c, r, rc, rr, loss_type=loss_type, beta=0.1)
            assert all(o.dtype == jnp.float32 for o in out)
            assert np.all(np.isfinite(np.asarray(out[0])))
            g = jax.grad(lambda x: jnp.sum(f(x, r, rc, rr, loss_type=loss_type)[0]))(c)
            assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- CPO / SimPO
def ref_cpo(c, r, *, beta, loss_type, ls=0.0, gamma=1.0):
    out = []
    for ci, ri in zip(c, r):
        z = ci - ri
        if loss_type == "sigmoid":
            out.append(-(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z))
        elif loss_type == "simpo":  # TRL: logits - gamma / beta, then the sigmoid loss of beta x logits
            x = beta * (z - gamma / beta)
            out.append(-(1 - ls) * logsig(x) - ls * logsig(-x))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * z))
        else:
            out.append((z - 1 / (2 * beta)) ** 2)
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo(loss_type):
    c, r, _, _ = batch(seed=8)
    ls = 0.2 if loss_type in ("sigmoid", "simpo") else 0.0
    for beta in (0.1, 1.0):
        kw = dict(beta=beta, loss_type=loss_type, label_smoothing=ls, simpo_gamma=0.7)
        losses, cr, rj = cpo_loss(jnp.asarray(c), jnp.asarray(r), **kw)
        np.testing.assert_allclose(np.asarray(losses), ref_cpo(c, r, beta=beta, loss_type=loss_type, ls=ls, gamma=0.7),
                                   rtol=1e-10)
        np.testing.assert_allclose(np.asarray(cr), beta * c, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(rj), beta * r, rtol=1e-12)

        def total(x, y):
            return jnp.sum(cpo_loss(x, y, **kw)[0])

        grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
        ref_grads = fd_grads(lambda x, y: sum(ref_cpo(x, y, beta=beta, loss_type=loss_type, ls=ls, gamma=0.7)),
                             [list(c), list(r)])
        for g, rg in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-5, atol=1e-6)
        directional_check(total, [jnp.asarray(c), jnp.asarray(r)])
    with pytest.raises(ConfigError, match="sigmoid, hinge, ipo, simpo"):
        cpo_loss(jnp.zeros(1), jnp.zeros(1), loss_type="orpo")


def ref_simpo(c, r, *, beta, gamma, ls):
    out = []
    for ci, ri in zip(c, r):
        x = beta * (ci - ri) - gamma
        out.append(-(1 - ls) * logsig(x) - ls * logsig(-x))
    return out


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo(ls):
    rng = np.random.RandomState(9)
    # length-averaged log-probs; beta 2 makes the last two gaps +-100 in the sigmoid's argument
    c = np.concatenate([-rng.uniform(0.1, 3, size=4), [-0.5, -50.5]])
    r = np.concatenate([-rng.uniform(0.1, 3, size=4), [-50.5, -0.5]])
    losses, cr, rj = simpo_loss(jnp.asarray(c), jnp.asarray(r), label_smoothing=ls)
    np.testing.assert_allclose(np.asarray(losses), ref_simpo(c, r, beta=2.0, gamma=1.0, ls=ls), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(cr), 2.0 * c, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(rj), 2.0 * r, rtol=1e-12)
    losses = simpo_loss(jnp.asarray(c), jnp.asarray(r), beta=1.5, gamma=0.5, label_smoothing=ls)[0]
    np.testing.assert_allclose(np.asarray(losses), ref_simpo(c, r, beta=1.5, gamma=0.5, ls=ls), rtol=1e-10)

    def total(x, y):
        return jnp.sum(simpo_loss(x, y, label_smoothing=ls)[0])

    grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
    ref_grads = fd_grads(lambda x, y: sum(ref_simpo(x, y, beta=2.0, gamma=1.0, ls=ls)), [list(c), list(r)])
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-5, atol=1e-7)
    directional_check(total, [jnp.asarray(c), jnp.asarray(r)])


# ---------------------------------------------------------------- ORPO
def ref_orpo_log_odds(a_c, a_r):
    """log(p/(1-p)) difference with p = exp(avg logp), written from the ORPO paper's eq. 4."""
    odds_c = a_c - math.log(-math.expm1(a_c))
    odds_r = a_r - math.log(-math.expm1(a_r))
    return odds_c - odds_r


def test_orpo():
    rng = np.random.RandomState(10)
    c = np.concatenate([-rng.uniform(0.05, 3, size=4), [-1e-9, -100.0, -0.01, -1e-6]])
    r = np.concatenate([-rng.uniform(0.05, 3, size=4), [-100.0, -1e-9, -100.0, -1e-7]])
    for beta in (0.1, 1.0):
        losses, cr, rj, lor, loc = orpo_loss(jnp.asarray(c), jnp.asarray(r), beta=beta)
        lo = [ref_orpo_log_odds(a, b) for a, b in zip(c, r)]
        np.testing.assert_allclose(np.asarray(losses), [-beta * logsig(x) for x in lo], rtol=1e-9)
        np.testing.assert_allclose(np.asarray(cr), beta * c, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(rj), beta * r, rtol=1e-12)
        assert lor.shape == () and loc.shape == ()
        assert float(lor) == pytest.approx(sum(logsig(x) for x in lo) / len(lo), rel=1e-9)
        assert float(loc) == pytest.approx(sum(lo) / len(lo), rel=1e-9)

        def total(x, y):
            return jnp.sum(orpo_loss(x, y, beta=beta)[0])

        # analytic derivative: d log_odds / d a_c = 1 + e^a/(1-e^a) = 1/(1-e^a) = -1/expm1(a)
        gc, gr = jax.grad(total, argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
        s = [sig(-x) for x in lo]  # d(-log sigma(x))/dx = -sigma(-x)
        exp_gc = [-beta * s[i] * (-1.0 / math.expm1(c[i])) for i in range(len(c))]
        exp_gr = [beta * s[i] * (-1.0 / math.expm1(r[i])) for i in range(len(r))]
        np.testing.assert_allclose(np.asarray(gc), exp_gc, rtol=1e-8)
        np.testing.assert_allclose(np.asarray(gr), exp_gr, rtol=1e-8)
        assert np.all(np.isfinite(np.asarray(gc))) and np.all(np.isfinite(np.asarray(gr)))
        # finite differences away from 0 (where h would cross the boundary)
        idx = [0, 1, 2, 3, 6]
        directional_check(total, [jnp.asarray(c[idx]), jnp.asarray(r[idx])], h=1e-7)


def test_orpo_probability_one_is_finite():
    losses, *_ = orpo_loss(jnp.asarray([0.0, -1.0]), jnp.asarray([-1.0, 0.0]))
    assert np.all(np.isfinite(np.asarray(losses)))
    g = jax.grad(lambda x: jnp.sum(orpo_loss(x, jnp.asarray([-1.0, -2.0]))[0]))(jnp.asarray([0.0, -1.0]))
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- KTO
def ref_kto(c, r, rc, rr, kl, *, beta, wd, wu):
    out = [wd * (1 - sig(beta * ((c[i] - rc[i]) - kl))) for i in range(len(c))]
    out += [wu * (1 - sig(beta * (kl - (r[i] - rr[i])))) for i in range(len(r))]
    return out


def ref_apo_zero_unpaired(c, r, rc, rr, *, beta, wd, wu):  # APO paper eq. 7, unpaired (TRL's KTOTrainer)
    out = [wd * (1 - sig(beta * (c[i] - rc[i]))) for i in range(len(c))]
    out += [wu * sig(beta * (r[i] - rr[i])) for i in range(len(r))]
    return out


@pytest.mark.parametrize("n_c,n_r", [(4, 3), (0, 3), (4, 0)])
def test_kto_apo_zero_unpaired(n_c, n_r):
    rng = np.random.RandomState(5 + n_c + n_r)
    c, rc, r, rr = (-rng.uniform(5, 60, size=n) for n in (n_c, n_c, n_r, n_r))
    kw = dict(beta=0.5, desirable_weight=1.33, undesirable_weight=0.8, loss_type="apo_zero_unpaired")
    args = tuple(map(jnp.asarray, (c, r, rc, rr)))
    losses, cr, rj = kto_loss(*args, 0.7, **kw)  # the reference point plays no part
    expected = ref_apo_zero_unpaired(c, r, rc, rr, beta=0.5, wd=1.33, wu=0.8)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(cr), 0.5 * (c - rc), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(rj), 0.5 * (r - rr), rtol=1e-12)
    if n_c and n_r:
        grads = jax.grad(lambda *xs: jnp.sum(kto_loss(*xs, 0.0, **kw)[0]), argnums=(0, 1, 2, 3))(*args)
        ref_grads = fd_grads(lambda *xs: sum(ref_apo_zero_unpaired(*xs, beta=0.5, wd=1.33, wu=0.8)),
                             [list(c), list(r), list(rc), list(rr)])
        for g, rg in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-5, atol=1e-9)
    with pytest.raises(ConfigError, match="kto, apo_zero_unpaired"):
        kto_loss(*args, 0.0, loss_type="apo_zero")


def test_kto_kl_estimate():
    p = np.array([-10.0, -20.0, -5.0])
    q = np.array([-12.0, -19.0, -6.5])
    kl = kto_kl(jnp.asarray(p), jnp.asarray(q))
    assert kl.shape == () and float(kl) == pytest.approx(((2.0) + (-1.0) + 1.5) / 3, rel=1e-12)
    assert float(kto_kl(jnp.asarray(q), jnp.asarray(p))) == 0.0  # clamped at 0
    assert float(kto_kl(jnp.zeros(0), jnp.zeros(0))) == 0.0
    g = jax.grad(lambda x: kto_kl(x, jnp.asarray(q)))(jnp.asarray(p))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("n_c,n_r", [(4, 3), (0, 3), (4, 0)])
def test_kto_loss(n_c, n_r):
    rng = np.random.RandomState(11 + n_c + n_r)
    c = -rng.uniform(5, 60, size=n_c)
    rc = -rng.uniform(5, 60, size=n_c)
    r = -rng.uniform(5, 60, size=n_r)
    rr = -rng.uniform(5, 60, size=n_r)
    if n_c:
        c[0], rc[0] = -1.0, -101.0  # log-ratio +100
    if n_r:
        r[0], rr[0] = -101.0, -1.0  # log-ratio -100
    kl = 0.7
    kw = dict(beta=0.5, desirable_weight=1.33, undesirable_weight=0.8)
    args = tuple(map(jnp.asarray, (c, r, rc, rr)))
    losses, cr, rj = kto_loss(*args, kl, **kw)
    assert losses.shape == (n_c + n_r,) and cr.shape == (n_c,) and rj.shape == (n_r,)
    expected = ref_kto(c, r, rc, rr, kl, beta=0.5, wd=1.33, wu=0.8)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(cr), 0.5 * (c - rc), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(rj), 0.5 * (r - rr), rtol=1e-12)

    def total(*xs):
        return jnp.mean(kto_loss(*xs, kl, **kw)[0])

    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*args)
    n = n_c + n_r
    ref_grads = fd_grads(
        lambda *xs: sum(ref_kto(*xs, kl, beta=0.5, wd=1.33, wu=0.8)) / n,
        [list(c), list(r), list(rc), list(rr)],
    )
    for g, rg in zip(grads, ref_grads):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), rg, rtol=1e-5, atol=1e-9)
    # kl is a constant reference point: no gradient flows into it
    gk = jax.grad(lambda k: jnp.sum(kto_loss(*args, k, **kw)[0]))(0.7)
    assert float(gk) == 0.0
    directional_check(total, list(args))


def test_float32_in_float32_out_even_with_x64_enabled():
    x = jnp.asarray([-1.0, -2.0], jnp.float32)
    y = jnp.asarray([-3.0, -0.5], jnp.float32)
    outs = [dpo_loss(x, y, y, x, loss_type=t) for t in ALL_DPO]
    outs += [cpo_loss(x, y, loss_type=t) for t in ("sigmoid", "hinge", "ipo", "simpo")]
    outs += [simpo_loss(x, y), orpo_loss(x, y), kto_loss(x, y, y, x, kto_kl(x, y)), kto_kl(x, y)]
    outs += [kto_loss(x[:0], y, y[:0], x, 0.2), kto_loss(x, y[:0], y, x[:0], 0.2)]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(outs)} == {jnp.dtype(jnp.float32)}


def test_bad_hyperparameters_raise_config_error():
    x = jnp.zeros(2)
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0, loss_type="ipo")
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="label_smoothing"):
        cpo_loss(x, x, label_smoothing=-0.1)
    with pytest.raises(ConfigError, match="beta"):
        simpo_loss(x, x, beta=-2.0)
    with pytest.raises(ConfigError, match="desirable_weight"):
        kto_loss(x, x, x, x, 0.0, desirable_weight=-1.0)


def test_clear_wins_ignores_float32_rounding_but_not_real_margins():
    """rewards/accuracies' tie rule: a difference below 2^-20 of the log-probs behind it is rounding."""
    from jaxalign.losses.preference import LOGP_RESOLUTION, clear_wins

    magnitude = np.array([0.1 * 4 * 130.0] * 4)  # beta x (|c| + |r| + |ref c| + |ref r|), sums of ~130
    noise = LOGP_RESOLUTION * magnitude
    diffs = np.array([0.5 * noise[0], -0.5 * noise[0], 2.0 * noise[0], 1e-3])
    assert np.asarray(clear_wins(diffs, magnitude)).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert np.asarray(clear_wins(np.array([1e-9]), np.array([0.0]))).tolist() == [1.0]  # no log-probs: strict >
