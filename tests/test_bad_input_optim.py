"""Bad input to NOG, OLR and the Pre-SVD optimizer: loud errors, NaN, or the right value.

The rule (docs/nog_olr.md): what shapes, dtypes or static arguments decide raises a
ValueError/TypeError naming the argument and its value or shape; what only the values decide
(under jit) gives NaN, never a plausible finite number; bfloat16/float16 inputs are computed in
float32 and returned in their own dtype. Each table below is one outcome.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from svdcond_jax import (
    find_olr_eta,
    nearest_orthogonal_gradient,
    optimal_eta,
    optimal_learning_rate,
    pre_svd_labels,
    pre_svd_mask,
    pre_svd_sgd,
)

PARAMS = {"stem": {"kernel": jnp.ones((3, 3, 2, 4)) / 3}, "fc": {"bias": jnp.zeros(4)}}
K = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
G = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)


def _olr_step(w, g, *, lr=0.1, jit=True, **kw):
    tx = optimal_learning_rate(lr, **kw)
    params = {"w": w}
    update = jax.jit(tx.update) if jit else tx.update
    updates, state = update({"w": g}, tx.init(params), params)
    return updates["w"], state.eta["w"]


def _nog(g, jit=True, **kw):
    tx = nearest_orthogonal_gradient(**kw)
    update = jax.jit(tx.update) if jit else tx.update
    return update({"w": g}, tx.init({"w": g}))[0]["w"]


def _injected_olr_step(**hyper):
    """One jitted OLR step whose hyperparameters are overwritten in the state (traced)."""
    tx = optax.inject_hyperparams(optimal_learning_rate)(learning_rate=0.1, momentum=0.5,
                                                         weight_decay=1e-3)
    params = {"w": K}
    state = tx.init(params)
    for k, v in hyper.items():
        state.hyperparams[k] = jnp.asarray(v, jnp.float32)
    return jax.jit(tx.update)({"w": G}, state, params)[0]["w"]


def _injected_sgd_step(**hyper):
    tx = optax.inject_hyperparams(pre_svd_sgd, static_args=("pre_svd",))(
        learning_rate=0.1, pre_svd=r"^stem/kernel$", nog=True, olr=True)
    state = tx.init(PARAMS)
    for k, v in hyper.items():
        state.hyperparams[k] = jnp.asarray(v, jnp.float32)
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.3, PARAMS)
    return jax.jit(tx.update)(grads, state, PARAMS)[0]


def _sgd_init(pre_svd="^stem/kernel$", params=PARAMS, **kw):
    return pre_svd_sgd(0.1, pre_svd, **kw).init(params)


# ------------------------------------------------------------------------------ ValueError

VALUE_ERRORS = {
    # optimal_learning_rate: static arguments
    "olr lr=-0.1": (lambda: optimal_learning_rate(-0.1), "learning_rate=-0.1"),
    "olr lr=0.0": (lambda: optimal_learning_rate(0.0), "learning_rate=0.0"),
    "olr lr=nan": (lambda: optimal_learning_rate(float("nan")), "learning_rate=nan"),
    "olr lr=inf": (lambda: optimal_learning_rate(float("inf")), "learning_rate=inf"),
    "olr lr=array(-0.1)": (lambda: optimal_learning_rate(jnp.asarray(-0.1)), "learning_rate"),
    "olr lr=vector": (lambda: optimal_learning_rate(jnp.ones(2)), r"learning_rate.*shape \(2,\)"),
    "olr momentum=-0.1": (lambda: optimal_learning_rate(0.1, momentum=-0.1), "momentum=-0.1"),
    "olr momentum=1": (lambda: optimal_learning_rate(0.1, momentum=1.0), "momentum=1.0"),
    "olr momentum=nan": (lambda: optimal_learning_rate(0.1, momentum=float("nan")), "momentum"),
    "olr weight_decay=-1e-4": (lambda: optimal_learning_rate(0.1, weight_decay=-1e-4),
                               "weight_decay=-0.0001"),
    "olr weight_decay=inf": (lambda: optimal_learning_rate(0.1, weight_decay=float("inf")),
                             "weight_decay=inf"),
    "olr nesterov without momentum": (lambda: optimal_learning_rate(0.1, nesterov=True),
                                      "nesterov=True needs momentum > 0"),
    "olr injected lr=-0.1 at init": (
        lambda: optax.inject_hyperparams(optimal_learning_rate)(learning_rate=-0.1).init(
            {"w": K}), "learning_rate"),
    # optimal_learning_rate: trees
    "olr params=None": (lambda: optimal_learning_rate(0.1).update({"w": G}, optimal_learning_rate(
        0.1).init({"w": K})), "params is None"),
    "olr trees differ": (lambda: _olr_tree_mismatch(), "different tree structures"),
    "olr leaf shapes differ": (lambda: _olr_step(K, G.T), r"'w' has shape \(4, 6\)"),
    # optimal_eta
    "optimal_eta shapes differ": (lambda: optimal_eta(K, G.T), r"w.shape=\(6, 4\)"),
    # NOG: static arguments
    "nog method='qr'": (lambda: nearest_orthogonal_gradient(method="qr"), "method='qr'"),
    "nog method=None": (lambda: nearest_orthogonal_gradient(method=None), "method=None"),
    "nog num_iters=0": (lambda: nearest_orthogonal_gradient(method="newton_schulz",
                                                            num_iters=0), "num_iters=0"),
    "nog num_iters=-1": (lambda: nearest_orthogonal_gradient(method="newton_schulz",
                                                             num_iters=-1), "num_iters=-1"),
    "nog num_iters with svd": (lambda: nearest_orthogonal_gradient(num_iters=10),
                               "num_iters=10 only applies"),
    "nog rtol=-0.1": (lambda: nearest_orthogonal_gradient(rtol=-0.1), "rtol=-0.1"),
    "nog rtol=1": (lambda: nearest_orthogonal_gradient(rtol=1.0), "rtol=1.0"),
    # NOG: shapes
    "nog 1-D update": (lambda: _nog(jnp.ones(3)), r"'w' has shape \(3,\)"),
    "nog scalar update": (lambda: _nog(jnp.ones(())), r"'w' has shape \(\)"),
    "nog 1-D param at init": (lambda: nearest_orthogonal_gradient().init(PARAMS),
                              r"'fc/bias' has shape \(4,\)"),
    # selections
    "pre_svd=''": (lambda: pre_svd_mask(PARAMS, ""), "empty regex"),
    "pre_svd invalid regex": (lambda: pre_svd_mask(PARAMS, "stem/(kernel"), "not a valid regex"),
    "pre_svd matches nothing": (lambda: _sgd_init(r"^module\.stem/kernel$"),
                                r"available paths: \['fc/bias', 'stem/kernel'\]"),
    "pre_svd all-False pytree": (
        lambda: pre_svd_mask(PARAMS, {"stem": {"kernel": False}, "fc": {"bias": False}}),
        "matches no parameter"),
    "pre_svd pytree wrong structure": (lambda: pre_svd_mask(PARAMS, {"stem": True, "fc": False}),
                                       "structure"),
    "pre_svd empty params": (lambda: pre_svd_mask({}, "kernel"), r"available paths: \[\]"),
    "pre_svd_sgd nog on a bias": (lambda: _sgd_init(r"bias", nog=True),
                                  r"'fc/bias' has shape \(4,\)"),
    "pre_svd_sgd lr=-0.1": (lambda: pre_svd_sgd(-0.1, "kernel"), "learning_rate=-0.1"),
    "pre_svd_sgd momentum=1": (lambda: pre_svd_sgd(0.1, "kernel", momentum=1.0), "momentum=1.0"),
    "pre_svd_sgd weight_decay=-1": (lambda: pre_svd_sgd(0.1, "kernel", weight_decay=-1.0),
                                    "weight_decay=-1.0"),
    "pre_svd_sgd nog_method='qr'": (lambda: pre_svd_sgd(0.1, "kernel", nog_method="qr"),
                                    "method='qr'"),
    "pre_svd_sgd nog_rtol=-1": (lambda: pre_svd_sgd(0.1, "kernel", nog_rtol=-1.0), "rtol=-1.0"),
}


def _olr_tree_mismatch():
    tx = optimal_learning_rate(0.1)
    return tx.update({"w": G, "v": G}, tx.init({"w": K}), {"w": K})


@pytest.mark.parametrize("name", list(VALUE_ERRORS))
def test_value_error(name):
    fn, match = VALUE_ERRORS[name]
    with pytest.raises(ValueError, match=match):
        fn()


# ------------------------------------------------------------------------------- TypeError

TYPE_ERRORS = {
    "olr inner=optax.sgd": (lambda: optimal_learning_rate(0.1, inner=optax.sgd(0.1)),
                            "inner= was removed"),
    "olr lr='0.1'": (lambda: optimal_learning_rate("0.1"), "learning_rate='0.1'"),
    "olr lr=True": (lambda: optimal_learning_rate(True), "learning_rate=True"),
    "olr lr=1+2j": (lambda: optimal_learning_rate(1 + 2j), r"learning_rate=\(1\+2j\)"),
    "olr lr=optax.sgd": (lambda: optimal_learning_rate(optax.sgd(0.1)), "GradientTransformation"),
    "olr momentum=None": (lambda: optimal_learning_rate(0.1, momentum=None), "momentum=None"),
    "olr nesterov=1": (lambda: optimal_learning_rate(0.1, momentum=0.9, nesterov=1),
                       "nesterov=1"),
    "olr int params": (lambda: optimal_learning_rate(0.1).init({"w": jnp.ones((2, 2), int)}),
                       "'w' has dtype int32"),
    "olr bool params": (lambda: optimal_learning_rate(0.1).init({"w": jnp.ones((2, 2), bool)}),
                        "'w' has dtype bool"),
    "olr complex params": (lambda: optimal_learning_rate(0.1).init(
        {"w": jnp.ones((2, 2), jnp.complex64)}), "'w' has dtype complex64"),
    "olr int grads": (lambda: _olr_step(K, jnp.ones((6, 4), jnp.int32)), "'w' has dtype int32"),
    "optimal_eta int": (lambda: optimal_eta(jnp.ones((2, 2), int), jnp.ones((2, 2), int)),
                        "w.dtype=int32"),
    "optimal_eta bool": (lambda: optimal_eta(K, jnp.ones((6, 4), bool)), "l.dtype=bool"),
    "optimal_eta complex": (lambda: optimal_eta(K.astype(jnp.complex64), G), "w.dtype=complex64"),
    "nog num_iters=2.5": (lambda: nearest_orthogonal_gradient(method="newton_schulz",
                                                              num_iters=2.5), "num_iters=2.5"),
    "nog num_iters=True": (lambda: nearest_orthogonal_gradient(method="newton_schulz",
                                                               num_iters=True), "num_iters=True"),
    "nog rtol='x'": (lambda: nearest_orthogonal_gradient(rtol="x"), "rtol='x'"),
    "nog int grads": (lambda: _nog(jnp.ones((3, 3), jnp.int32)), "'w' has dtype int32"),
    "nog complex grads": (lambda: _nog(jnp.ones((3, 3), jnp.complex64)), "complex64"),
    "pre_svd=123": (lambda: _sgd_init(123), r"got 123 \(int\)"),
    "pre_svd=None": (lambda: pre_svd_sgd(0.1, None), r"got None"),
    "pre_svd=True": (lambda: pre_svd_mask(PARAMS, True), r"got True"),
    "pre_svd pytree of ints": (
        lambda: pre_svd_mask(PARAMS, {"stem": {"kernel": 1}, "fc": {"bias": 0}}),
        r"0 \(int\) at 'fc/bias'"),
    "pre_svd callable returns None": (lambda: pre_svd_mask(PARAMS, lambda p, x: None),
                                      "returned None"),
    "pre_svd callable returns a match": (
        lambda: pre_svd_mask(PARAMS, lambda p, x: re.search("", p)), "returned <re.Match"),
    "pre_svd=nnx.Param": (lambda: pre_svd_labels(nnx.Param), "select by path"),
    "pre_svd=dict class": (lambda: pre_svd_labels(dict), "got the class"),
    "pre_svd_sgd nog='yes'": (lambda: pre_svd_sgd(0.1, "kernel", nog="yes"), "nog='yes'"),
    "pre_svd_sgd int params": (lambda: _sgd_init(params={"kernel": jnp.ones((2, 2), int)}),
                               "'kernel' has dtype int32"),
}


@pytest.mark.parametrize("name", list(TYPE_ERRORS))
def test_type_error(name):
    fn, match = TYPE_ERRORS[name]
    with pytest.raises(TypeError, match=match):
        fn()


# ------------------------------------------------------------------------------------- NaN

NAN = jnp.nan
INF = jnp.inf

GIVES_NAN = {
    "optimal_eta NaN weight": lambda: optimal_eta(K.at[0, 0].set(NAN), G),
    "optimal_eta Inf weight": lambda: optimal_eta(K.at[0, 0].set(INF), G),
    "optimal_eta NaN grad": lambda: optimal_eta(K, G.at[1, 1].set(NAN)),
    "optimal_eta -Inf grad": lambda: optimal_eta(K, G.at[1, 1].set(-INF)),
    "olr NaN weight (wd=0)": lambda: _olr_step(K.at[0, 0].set(NAN), G),
    "olr Inf weight": lambda: _olr_step(K.at[0, 0].set(INF), G, momentum=0.9),
    "olr NaN grad": lambda: _olr_step(K, G.at[0, 0].set(NAN)),
    "olr Inf grad": lambda: _olr_step(K, G.at[0, 0].set(INF), weight_decay=1e-3),
    "olr schedule < 0": lambda: _olr_step(K, G, lr=lambda count: -0.1),
    "olr schedule NaN": lambda: _olr_step(K, G, lr=lambda count: jnp.nan),
    "olr injected lr < 0": lambda: _injected_olr_step(learning_rate=-0.1),
    "olr injected lr Inf": lambda: _injected_olr_step(learning_rate=INF),
    "olr injected momentum 1.5": lambda: _injected_olr_step(momentum=1.5),
    "olr injected weight_decay < 0": lambda: _injected_olr_step(weight_decay=-1.0),
    "pre_svd_sgd injected lr < 0": lambda: _injected_sgd_step(learning_rate=-0.1),
    "pre_svd_sgd injected momentum < 0": lambda: _injected_sgd_step(momentum=-0.5),
    "nog svd NaN grad": lambda: _nog(G.at[2, 2].set(NAN)),
    "nog svd Inf grad": lambda: _nog(G.at[2, 2].set(INF)),  # LAPACK would never return
    "nog newton_schulz NaN grad": lambda: _nog(G.at[2, 2].set(NAN), method="newton_schulz"),
    "nog newton_schulz -Inf grad": lambda: _nog(G.at[2, 2].set(-INF), method="newton_schulz"),
    "nog bf16 Inf grad": lambda: _nog(G.at[0, 0].set(INF).astype(jnp.bfloat16)),
}


@pytest.mark.parametrize("name", list(GIVES_NAN))
def test_gives_nan(name):
    out = GIVES_NAN[name]()
    for x in jax.tree_util.tree_leaves(out):
        assert bool(jnp.all(jnp.isnan(x))), f"{name}: expected all NaN, got {x}"


# ---------------------------------------------------------------------------- right values


def _eta_f64(w, l):  # noqa: E741
    w, l = np.ravel(w).astype(np.float64), np.ravel(l).astype(np.float64)  # noqa: E741
    den = (w @ w) * (l @ l) + 2 * (l @ w) ** 2
    return 0.0 if den == 0 else (w @ w) * (l @ w) / den


def _polar_f64(g):
    m = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return (u @ vt).reshape(g.shape)


def _check_olr_zero_grad():
    u, eta = _olr_step(K, jnp.zeros_like(K), weight_decay=1e-2)
    np.testing.assert_allclose(eta, 0.1, rtol=1e-6)  # eta* = 0: the switch keeps lr
    np.testing.assert_allclose(u, -0.1 * 1e-2 * K, rtol=1e-5)


def _check_olr_zero_weight():
    u, eta = _olr_step(jnp.zeros_like(K), G)
    np.testing.assert_allclose(eta, 0.1, rtol=1e-6)
    np.testing.assert_allclose(u, -0.1 * G, rtol=1e-5)


def _check_olr_empty_tree():
    tx = optimal_learning_rate(0.1, momentum=0.9)
    u, state = tx.update({}, tx.init({}), {})
    assert u == {} and find_olr_eta(state) is None


def _check_olr_scalar_leaf():
    w, g = jnp.asarray(2.0), jnp.asarray(0.5)  # eta* = w^2 g w / (w^2 g^2 + 2 g^2 w^2) = 4/3
    u, eta = _olr_step(w, g, lr=5.0)
    np.testing.assert_allclose(eta, 4 / 3, rtol=1e-6)
    np.testing.assert_allclose(u, -4 / 3 * 0.5, rtol=1e-6)


def _check_olr_schedule_zero():
    u, eta = _olr_step(K, G, lr=lambda count: 0.0)  # a warm-up starting at 0: no step
    assert float(eta) == 0.0 and bool(jnp.all(u == 0))


def _check_olr_low_precision(dtype):
    w, g = K.astype(dtype), (0.05 * K + G).astype(dtype)
    u, eta = _olr_step(w, g, momentum=0.9, weight_decay=1e-2)
    assert u.dtype == dtype and eta.dtype == jnp.float32
    w32, g32 = w.astype(jnp.float32), g.astype(jnp.float32)
    e = _eta_f64(w32, g32)
    e = e if 0 < e < 0.1 else 0.1
    np.testing.assert_allclose(eta, e, rtol=1e-5)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(u, np.float32), -e * (g32 + 1e-2 * w32),
                               rtol=2 * eps, atol=2 * eps * float(jnp.abs(g32).max()) * e)


def _check_olr_state_f32_for_bf16():
    tx = optimal_learning_rate(0.1, momentum=0.9)
    state = tx.init({"w": K.astype(jnp.bfloat16)})
    assert state.trace["w"].dtype == jnp.float32 and state.eta["w"].dtype == jnp.float32


def _check_eta_scale(sw, sg):
    w, g = K * sw, (0.1 * K + G) * sg
    expected = _eta_f64(np.asarray(K, np.float64) * sw, (0.1 * np.asarray(K, np.float64)
                                                         + np.asarray(G, np.float64)) * sg)
    np.testing.assert_allclose(optimal_eta(w, g), expected, rtol=1e-5)


def _check_eta_low_precision(dtype):
    w, g = K.astype(dtype), (0.1 * K + G).astype(dtype)
    eta = optimal_eta(w, g)
    assert eta.dtype == dtype
    np.testing.assert_allclose(float(eta), _eta_f64(w.astype(jnp.float32), g.astype(jnp.float32)),
                               rtol=2 * float(jnp.finfo(dtype).eps))


def _check_nog_orthogonal(g, rtol=None, **kw):
    out = _nog(g, **kw)
    assert out.dtype == g.dtype
    tol = rtol or 2e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), _polar_f64(g), atol=tol)


def _check_find_olr_eta_none():
    assert find_olr_eta(None) is None
    assert find_olr_eta(optax.sgd(0.1).init(PARAMS)) is None


def _check_find_olr_eta_two_leaves():
    tx = optimal_learning_rate(0.1)
    params = {"a": K, "b": 2 * K}
    _, state = tx.update({"a": G, "b": -G}, tx.init(params), params)
    etas = find_olr_eta(state)
    assert etas.shape == (2,)


def _check_regex_with_special_chars():
    params = {"module.stem": {"kernel": jnp.ones((3, 3))}, "modulexstem": {"kernel": jnp.ones(2)}}
    mask = pre_svd_mask(params, r"^module\.stem/kernel$")
    assert mask == {"module.stem": {"kernel": True}, "modulexstem": {"kernel": False}}


CORRECT = {
    "olr zero grad": _check_olr_zero_grad,
    "olr zero weight": _check_olr_zero_weight,
    "olr empty tree": _check_olr_empty_tree,
    "olr scalar leaf": _check_olr_scalar_leaf,
    "olr schedule at 0": _check_olr_schedule_zero,
    "olr bfloat16": lambda: _check_olr_low_precision(jnp.bfloat16),
    "olr float16": lambda: _check_olr_low_precision(jnp.float16),
    "olr bf16 state in float32": _check_olr_state_f32_for_bf16,
    "optimal_eta zero weight": lambda: np.testing.assert_equal(
        float(optimal_eta(jnp.zeros_like(K), G)), 0.0),
    "optimal_eta empty": lambda: np.testing.assert_equal(
        float(optimal_eta(jnp.zeros((0, 3)), jnp.zeros((0, 3)))), 0.0),
    "optimal_eta tiny grad 1e-30": lambda: _check_eta_scale(1.0, 1e-30),
    "optimal_eta huge weight 1e25": lambda: _check_eta_scale(1e25, 1.0),
    "optimal_eta tiny both 1e-25": lambda: _check_eta_scale(1e-25, 1e-25),
    "optimal_eta bfloat16": lambda: _check_eta_low_precision(jnp.bfloat16),
    "optimal_eta float16": lambda: _check_eta_low_precision(jnp.float16),
    "nog zero grad": lambda: np.testing.assert_array_equal(_nog(jnp.zeros((4, 3))), 0.0),
    "nog empty leaf": lambda: np.testing.assert_equal(_nog(jnp.zeros((0, 3))).shape, (0, 3)),
    "nog empty tree": lambda: np.testing.assert_equal(
        nearest_orthogonal_gradient().update({}, optax.EmptyState())[0], {}),
    "nog svd bfloat16": lambda: _check_nog_orthogonal(G.astype(jnp.bfloat16), rtol=1e-2),
    "nog newton_schulz float16": lambda: _check_nog_orthogonal(
        G.astype(jnp.float16), rtol=2e-3, method="newton_schulz"),
    "nog newton_schulz huge grad 1e25": lambda: _check_nog_orthogonal(
        G * 1e25, method="newton_schulz"),
    "nog newton_schulz tiny grad 1e-30": lambda: _check_nog_orthogonal(
        G * 1e-30, method="newton_schulz"),
    "nog svd tiny grad 1e-30": lambda: _check_nog_orthogonal(G * 1e-30),
    "find_olr_eta without OLR": _check_find_olr_eta_none,
    "find_olr_eta two leaves": _check_find_olr_eta_two_leaves,
    "pre_svd regex with dots": _check_regex_with_special_chars,
}


@pytest.mark.parametrize("name", list(CORRECT))
def test_correct_value(name):
    CORRECT[name]()
