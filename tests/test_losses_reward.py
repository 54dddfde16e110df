"""Bradley-Terry reward-model loss against the formula written out in plain Python."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import reward_loss


pytestmark = pytest.mark.usefixtures("x64")  # every test here computes in float64


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_reward_loss(c, r, margin=None, coef=None):
    n = len(c)
    m = [0.0] * n if margin is None else ([margin] * n if np.isscalar(margin) else list(margin))
    loss = sum(-logsig(c[i] - r[i] - m[i]) for i in range(n)) / n
    if coef is not None:
        loss += coef * sum((c[i] + r[i]) ** 2 for i in range(n)) / n
    return loss


def data():
    rng = np.random.RandomState(0)
    c = np.concatenate([rng.normal(size=5), [60.0, -50.0]])  # gaps of +-100 in the last rows
    r = np.concatenate([rng.normal(size=5), [-40.0, 50.0]])
    margin = np.concatenate([rng.uniform(0, 2, size=5), [0.5, 1.0]])
    return c, r, margin


@pytest.mark.parametrize("use_margin", [None, "scalar", "array"])
@pytest.mark.parametrize("coef", [None, 0.01])
def test_reward_loss_value_and_grad(use_margin, coef):
    c, r, margin_arr = data()
    margin = {None: None, "scalar": 0.3, "array": margin_arr}[use_margin]
    m_arg = None if margin is None else (margin if np.isscalar(margin) else jnp.asarray(margin))
    loss = reward_loss(jnp.asarray(c), jnp.asarray(r), margin=m_arg, center_rewards_coefficient=coef)
    assert loss.shape == () and loss.dtype == jnp.float64
    assert float(loss) == pytest.approx(ref_reward_loss(c, r, margin, coef), rel=1e-12)

    f = lambda x, y: reward_loss(x, y, margin=m_arg, center_rewards_coefficient=coef)  # noqa: E731
    gc, gr = jax.grad(f, argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
    # analytic: d/dc -log s(c - r - m) = -s(-(c - r - m)) / n ; centring adds 2 coef (c + r) / n
    n = len(c)
    m = [0.0] * n if margin is None else ([margin] * n if np.isscalar(margin) else list(margin))
    for i in range(n):
        d = c[i] - r[i] - m[i]
        s = math.exp(logsig(-d))
        centre = 0.0 if coef is None else 2 * coef * (c[i] + r[i]) / n
        assert float(gc[i]) == pytest.approx(-s / n + centre, rel=1e-10, abs=1e-300)
        assert float(gr[i]) == pytest.approx(s / n + centre, rel=1e-10, abs=1e-300)
    # finite differences of the implementation along a random direction
    h = 1e-6
    v1, v2 = np.random.RandomState(1).normal(size=(2, n))
    num = (float(f(jnp.asarray(c + h * v1), jnp.asarray(r + h * v2)))
           - float(f(jnp.asarray(c - h * v1), jnp.asarray(r - h * v2)))) / (2 * h)
    assert num == pytest.approx(float(jnp.sum(gc * v1) + jnp.sum(gr * v2)), rel=1e-6)


def test_reward_loss_extreme_is_finite_and_float32():
    with jax.enable_x64(False):
        c = jnp.asarray([-60.0, 60.0], dtype=jnp.float32)
        r = jnp.asarray([40.0, -40.0], dtype=jnp.float32)
        loss = reward_loss(c, r, center_rewards_coefficient=0.01)
        assert loss.dtype == jnp.float32
        assert float(loss) == pytest.approx((100.0 + 0.0) / 2 + 0.01 * (400 + 400) / 2, rel=1e-6)
        g = jax.grad(reward_loss)(c, r)
        assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))


def test_reward_loss_accepts_value_head_shape():
    c, r, _ = data()
    a = reward_loss(jnp.asarray(c)[:, None], jnp.asarray(r)[:, None])
    assert float(a) == pytest.approx(ref_reward_loss(c, r), rel=1e-12)


def test_reward_loss_jit():
    c, r, m = data()
    f = jax.jit(reward_loss, static_argnames=("center_rewards_coefficient",))
    out = f(jnp.asarray(c), jnp.asarray(r), margin=jnp.asarray(m), center_rewards_coefficient=0.01)
    assert float(out) == pytest.approx(ref_reward_loss(c, r, m, 0.01), rel=1e-12)
