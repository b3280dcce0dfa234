"""Tests for NOG (Eqs. 14-17) and OLR (Eqs. 18-21, Proposition 1 as it really holds)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from svdcond_jax.transforms import (
    OptimalLearningRateState,
    nearest_orthogonal_gradient,
    optimal_eta,
    optimal_learning_rate,
)

# ------------------------------------------------------------------------------ NOG

KERNEL_SHAPES = [
    (16, 10),  # dense, tall
    (4, 12),  # dense, wide
    (3, 3, 3, 16),  # CIFAR-like stem: 27 x 16, tall
    (3, 3, 2, 32),  # 18 x 32, wide
    (1, 1, 8, 4),  # 1x1 conv, tall
    (1, 1, 4, 8),  # 1x1 conv, wide
]


def _polar_f64(g: np.ndarray) -> np.ndarray:
    m = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return (u @ vt).reshape(g.shape)


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_nog_output_is_orthogonal_and_matches_numpy(shape, method):
    g = np.random.default_rng(sum(shape)).normal(size=shape)
    tx = nearest_orthogonal_gradient(method=method)
    grads = {"w": jnp.asarray(g, jnp.float32)}
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    chex.assert_shape(out["w"], shape)
    m = np.asarray(out["w"], np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(np.linalg.svd(m, compute_uv=False), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["w"], _polar_f64(g), atol=1e-4)


def test_nog_only_masked_leaves_change():
    rng = np.random.default_rng(0)
    grads = {
        "stem": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
               "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
    }
    mask = {"stem": {"kernel": True}, "fc": {"kernel": False, "bias": False}}
    tx = optax.masked(nearest_orthogonal_gradient(), mask)
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(out["fc"]["kernel"], grads["fc"]["kernel"])
    np.testing.assert_array_equal(out["fc"]["bias"], grads["fc"]["bias"])
    expected = _polar_f64(np.asarray(grads["stem"]["kernel"]))
    np.testing.assert_allclose(out["stem"]["kernel"], expected, atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_nog_zero_gradient_gives_zero_update(method):
    tx = nearest_orthogonal_gradient(method=method)
    grads = {"w": jnp.zeros((3, 3, 2, 4))}
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(out["w"], 0.0)


def test_nog_low_ndim_leaf_raises_naming_path():
    tx = nearest_orthogonal_gradient()
    grads = {"fc": {"bias": jnp.ones(3), "kernel": jnp.ones((3, 3))}}
    with pytest.raises(ValueError, match="fc/bias"):
        tx.update(grads, tx.init(grads))


def test_nog_unknown_method_raises():
    with pytest.raises(ValueError, match="method"):
        nearest_orthogonal_gradient(method="qr")


# ------------------------------------------------------------------------------ optimal_eta


def _eta_f64(w: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    w, l = np.ravel(w).astype(np.float64), np.ravel(l).astype(np.float64)  # noqa: E741
    return (w @ w) * (l @ w) / ((w @ w) * (l @ l) + 2 * (l @ w) ** 2)


@pytest.mark.parametrize("seed", range(4))
def test_optimal_eta_matches_eq20(seed):
    rng = np.random.default_rng(seed)
    w, g = rng.normal(size=(3, 3, 2, 5)), rng.normal(size=(3, 3, 2, 5))
    eta = optimal_eta(jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(eta, _eta_f64(w, g), rtol=1e-4)


def test_optimal_eta_minimises_first_order_objective(x64):
    """eta* is the stationary point of the linearised Eq. 19 (the i-term dropped, Eq. 20)."""
    rng = np.random.default_rng(11)
    w, g = rng.normal(size=20), rng.normal(size=20) + 0.5 * rng.normal(size=20)
    # e(eta) with i neglected: ((w - eta l).(w - eta l))^2 up to the dropped eta^4 l.l term
    # expands to (w.w)^2 - 4 eta (w.w)(l.w) + eta^2 (2 (w.w)(l.l) + 4 (l.w)^2).
    ww, lw, ll = w @ w, g @ w, g @ g
    quad = lambda e: ww**2 - 4 * e * ww * lw + e**2 * (2 * ww * ll + 4 * lw**2)
    eta = float(optimal_eta(jnp.asarray(w), jnp.asarray(g)))
    assert quad(eta) <= min(quad(eta + 1e-3), quad(eta - 1e-3))


def test_optimal_eta_degenerate_is_zero_not_nan():
    z = jnp.zeros((4, 4))
    assert float(optimal_eta(z, jnp.ones((4, 4)))) == 0.0
    assert float(optimal_eta(jnp.ones((4, 4)), z)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        optimal_eta(jnp.ones((2, 3)), jnp.ones((3, 2)))


def _random_orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("n", [4, 9, 16])
def test_proposition1_true_form(n, x64):
    """For orthogonal W, l with t = <l, W> > 0: eta* = N t / (N^2 + 2 t^2) in (0, 1/(2 sqrt 2)],
    and the paper's upper bound N^2 / (N^2 + 2) holds."""
    rng = np.random.default_rng(n)
    pairs = [(_random_orthogonal(rng, n), _random_orthogonal(rng, n)) for _ in range(200)]
    ws = jnp.asarray(np.stack([p[0] for p in pairs]))
    ls = jnp.asarray(np.stack([p[1] for p in pairs]))
    etas = np.asarray(jax.vmap(optimal_eta)(ws, ls))
    ts = np.einsum("bij,bij->b", ws, ls)
    pos = ts > 1e-9  # t is O(1) here; a margin keeps the sign test off round-off
    assert pos.sum() > 50
    np.testing.assert_allclose(etas, n * ts / (n**2 + 2 * ts**2), rtol=1e-10, atol=1e-14)
    assert np.all(etas[pos] > 0)
    assert np.all(etas[pos] <= 1 / (2 * math.sqrt(2)) + 1e-12)
    assert np.all(etas[pos] <= n**2 / (n**2 + 2))  # paper's upper bound: true but loose


def test_proposition1_maximum_at_t_equals_n_over_sqrt2(x64):
    n = 8
    t = jnp.linspace(1e-3, n, 2001)
    eta = n * t / (n**2 + 2 * t**2)
    t_max = float(t[jnp.argmax(eta)])
    assert abs(t_max - n / math.sqrt(2)) < 5e-3
    assert abs(float(eta.max()) - 1 / (2 * math.sqrt(2))) < 1e-8
    # and optimal_eta attains it on an orthogonal pair with <l, W> = N / sqrt(2):
    theta = math.acos(1 / math.sqrt(2))  # rotate every 2-plane by 45 degrees: t = N cos(theta)
    block = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    l = np.kron(np.eye(n // 2), block)  # noqa: E741
    np.testing.assert_allclose(optimal_eta(jnp.eye(n), jnp.asarray(l)), 1 / (2 * math.sqrt(2)),
                               rtol=1e-10)


def test_proposition1_paper_lower_bound_fails(x64):
    """Erratum: the paper's lower bound 1/(N^2+2) fails for some orthogonal pairs (t > 0)."""
    n = 9
    rng = np.random.default_rng(2022)
    ws = np.stack([_random_orthogonal(rng, n) for _ in range(1000)])
    ls = np.stack([_random_orthogonal(rng, n) for _ in range(1000)])
    etas = np.asarray(jax.vmap(optimal_eta)(jnp.asarray(ws), jnp.asarray(ls)))
    ts = np.einsum("bij,bij->b", ws, ls)
    below = (ts > 0) & (etas < 1 / (n**2 + 2))
    frac = below.sum() / (ts > 0).sum()
    assert below.any(), "expected a counterexample to the paper's lower bound"
    assert 0.01 < frac < 0.2  # about 6% (docs/nog_olr.md)


# ------------------------------------------------------------------------------ OLR transform


def _olr_step(tx, w, g, state=None):
    params, grads = {"w": jnp.asarray(w, jnp.float32)}, {"w": jnp.asarray(g, jnp.float32)}
    state = tx.init(params) if state is None else state
    return jax.jit(tx.update)(grads, state, params)


def test_olr_switch_uses_eta_star_when_between_zero_and_lr():
    w = np.eye(4)
    g = 0.05 * np.eye(4) + np.diag([1.0, -1.0, 1.0, -1.0])  # small positive <l, w>
    eta_star = _eta_f64(w, g)
    assert 0 < eta_star < 0.1
    updates, state = _olr_step(optimal_learning_rate(0.1), w, g)
    np.testing.assert_allclose(state.eta["w"], eta_star, rtol=1e-5)
    np.testing.assert_allclose(updates["w"], -eta_star * g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("g_scale", [1.0, -1.0])
def test_olr_switch_falls_back_to_lr(g_scale):
    w = np.eye(4)  # g = +w: eta* = 1/3 >= lr; g = -w: eta* < 0
    updates, state = _olr_step(optimal_learning_rate(0.1), w, g_scale * w)
    np.testing.assert_allclose(state.eta["w"], 0.1)
    np.testing.assert_allclose(updates["w"], -0.1 * g_scale * w, rtol=1e-6)


@pytest.mark.parametrize("which", ["weight", "grad"])
def test_olr_degenerate_input_gives_lr_not_nan(which):
    w, g = np.ones((3, 4)), np.ones((3, 4))
    if which == "weight":
        w = np.zeros_like(w)
    else:
        g = np.zeros_like(g)
    updates, state = _olr_step(optimal_learning_rate(0.05), w, g)
    chex.assert_tree_all_finite(updates)
    np.testing.assert_allclose(state.eta["w"], 0.05)


def test_olr_follows_schedule():
    sched = optax.piecewise_constant_schedule(1.0, {2: 0.01})
    tx = optimal_learning_rate(sched)
    w, g = np.eye(3), np.eye(3)  # eta* = 1/3: below lr=1 (steps 0, 1), above 0.01 after
    state = None
    etas = []
    for _ in range(4):
        _, state = _olr_step(tx, w, g, state)
        etas.append(float(state.eta["w"]))
    np.testing.assert_allclose(etas, [1 / 3, 1 / 3, 0.01, 0.01], rtol=1e-6)
    assert int(state.count) == 4


def test_olr_inject_hyperparams():
    tx = optax.inject_hyperparams(optimal_learning_rate)(learning_rate=0.2)
    w, g = np.eye(3), -np.eye(3)
    updates, state = _olr_step(tx, w, g)
    np.testing.assert_allclose(updates["w"], 0.2 * np.eye(3), rtol=1e-6)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    updates, state = _olr_step(tx, w, g, state)
    np.testing.assert_allclose(updates["w"], 0.05 * np.eye(3), rtol=1e-6)
    assert isinstance(state.inner_state, OptimalLearningRateState)


def test_olr_inject_hyperparams_momentum_and_schedule():
    """Injected momentum / weight decay act like the static ones; a schedule is injected."""
    sched = optax.piecewise_constant_schedule(0.1, {1: 0.5})
    static = optimal_learning_rate(sched, momentum=0.9, weight_decay=1e-2)
    injected = optax.inject_hyperparams(optimal_learning_rate)(
        learning_rate=sched, momentum=0.9, weight_decay=1e-2)
    w = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)), jnp.float32)}
    s1, s2 = static.init(w), injected.init(w)
    for _ in range(3):
        g = jax.tree_util.tree_map(lambda x: 0.3 * x + 0.1, w)
        u1, s1 = jax.jit(static.update)(g, s1, w)
        u2, s2 = jax.jit(injected.update)(g, s2, w)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-8)
        w = optax.apply_updates(w, u1)


def _torch_sgd_olr_f64(w, grads, lr, momentum, weight_decay, nesterov):
    """Float64 emulation: torch.optim.SGD with its rate replaced by eta (Eqs. 20-21)."""
    w, buf, etas, steps = np.asarray(w, np.float64), None, [], []
    for g in grads:
        e = _eta_f64(w, g)
        eta = e if 0 < e < lr else lr
        d = g + weight_decay * w
        buf = d if buf is None else momentum * buf + d
        step = d + momentum * buf if nesterov else buf
        etas.append(eta)
        steps.append(-eta * step)
        w = w - eta * step
    return etas, steps


@pytest.mark.parametrize("momentum,weight_decay,nesterov",
                         [(0.0, 0.0, False), (0.9, 5e-4, False), (0.9, 1e-2, True)])
def test_olr_is_torch_sgd_with_eta(momentum, weight_decay, nesterov, x64):
    """eta from the incoming gradient multiplies the whole torch SGD step (buf = d first)."""
    rng = np.random.default_rng(1)
    lr = 0.1
    w0 = rng.normal(size=(5, 3))
    def slightly_along_w(c):  # noise orthogonal to w0, plus c w0: eta* = c N / (|n|^2 + 3c^2 N)
        n = rng.normal(size=w0.shape)
        return n - (n.ravel() @ w0.ravel()) / (w0.ravel() @ w0.ravel()) * w0 + c * w0

    # eta* in (0, lr) twice, then eta* < 0 and eta* > lr: the switch keeps lr.
    grads = [slightly_along_w(0.05), slightly_along_w(0.03), -w0, 3 * w0]
    etas, steps = _torch_sgd_olr_f64(w0, grads, lr, momentum, weight_decay, nesterov)
    assert any(0 < e < lr for e in etas) and any(e == lr for e in etas)
    tx = optimal_learning_rate(lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for g, eta, step in zip(grads, etas, steps, strict=True):
        updates, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state, params)
        np.testing.assert_allclose(state.eta["w"], eta, rtol=1e-10)
        np.testing.assert_allclose(updates["w"], step, rtol=1e-10, atol=1e-14)
        params = optax.apply_updates(params, updates)


def test_olr_inner_removed_raises_naming_the_change():
    with pytest.raises(TypeError, match=r"inner= was removed.*momentum=.*weight_decay="):
        optimal_learning_rate(0.1, inner=optax.sgd(0.1, momentum=0.9))


def test_olr_state_documented_field_by_field():
    import pydoc

    text = " ".join(pydoc.render_doc(OptimalLearningRateState).split())
    assert "Alias for field number" not in text
    for field in OptimalLearningRateState._fields:
        doc = getattr(OptimalLearningRateState, field).__doc__
        assert len(doc) > 40 and " ".join(doc.split()) in text


def test_olr_requires_params():
    tx = optimal_learning_rate(0.1)
    grads = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(grads))


@pytest.mark.parametrize("rtol", [None, 1e-3])
def test_nog_forwards_rtol_only_when_given(rtol, monkeypatch):
    """rtol reaches polar_factor only when set, so NOG works with and without rank-aware
    polar factors (their behaviour is tested in tests/test_orthogonal.py)."""
    import svdcond_jax.transforms as transforms

    seen = []

    def fake_polar(m, **kwargs):
        seen.append(kwargs)
        return m

    monkeypatch.setattr(transforms, "polar_factor", fake_polar)
    tx = nearest_orthogonal_gradient(rtol=rtol)
    g = {"w": jnp.ones((3, 2))}
    tx.update(g, tx.init(g))
    expected = {"method": "svd"} if rtol is None else {"method": "svd", "rtol": rtol}
    assert seen == [expected]
