"""NOG and per-layer OLR on every matrix layer (nog_optimizer), and Muon's conventions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

import svdcond_jax as sc
from svdcond_jax.transforms import ema_momentum, scale_by_shape


def _params(seed: int = 0) -> dict:
    """Conv kernels (3x3 and 1x1), a hidden dense kernel, BN scale/bias, biases, a head."""
    rng = np.random.default_rng(seed)
    tree = {"conv1": {"kernel": rng.normal(size=(3, 3, 3, 8)) / 5, "bias": np.zeros(8)},
            "conv2": {"kernel": rng.normal(size=(1, 1, 8, 16)) / 3},
            "bn": {"scale": np.ones(16), "bias": np.zeros(16)},
            "dense": {"kernel": rng.normal(size=(16, 12)) / 4},
            "fc": {"kernel": rng.normal(size=(12, 10)) / 4, "bias": np.zeros(10)}}
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _grads(params: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)


MATRICES = ("conv1/kernel", "conv2/kernel", "dense/kernel")


def _leaf(tree: dict, path: str) -> jax.Array:
    a, b = path.split("/")
    return tree[a][b]


def _polar_f64(g) -> np.ndarray:
    m = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return (u @ vt).reshape(g.shape)


def test_default_selection_is_every_kernel_but_the_head():
    params = _params()
    labels = sc.nog_labels()(params)
    assert labels == {"conv1": {"kernel": "nog", "bias": "rest"}, "conv2": {"kernel": "nog"},
                      "bn": {"scale": "rest", "bias": "rest"}, "dense": {"kernel": "nog"},
                      "fc": {"kernel": "rest", "bias": "rest"}}
    # the GCP model's Pre-SVD conv sits under "head/" but is not the classifier
    gcp = {"head": {"pre_svd_conv": {"kernel": jnp.zeros((1, 1, 4, 4))}},
           "fc": {"kernel": jnp.zeros((10, 2))}}
    assert sc.nog_mask(gcp) == {"head": {"pre_svd_conv": {"kernel": True}},
                                "fc": {"kernel": False}}


def test_selection_forms_and_exclusions():
    params = _params()
    with_head = sc.nog_mask(params, exclude=None)
    assert with_head["fc"]["kernel"] and not with_head["fc"]["bias"]
    only_convs = sc.nog_mask(params, select=r"^conv", exclude=None)
    assert [only_convs[k]["kernel"] for k in ("conv1", "conv2", "dense")] == [True, True, False]
    assert not only_convs["conv1"]["bias"]  # ndim < 2 is never selected
    by_callable = sc.nog_mask(params, select=lambda path, x: x.ndim == 4, exclude=None)
    assert by_callable == only_convs
    labels = jax.tree_util.tree_map(lambda _: False, params)
    labels["dense"]["kernel"] = True
    assert sc.nog_mask(params, select=labels, exclude=None) == labels
    with pytest.raises(ValueError, match="exclude=.*matches no parameter.*paths"):
        sc.nog_mask({"conv": {"kernel": jnp.zeros((3, 3))}, "out_proj": {"kernel":
                                                                       jnp.zeros((3, 2))}})
    with pytest.raises(ValueError, match="selects no parameter"):
        sc.nog_mask(params, select=r"^nothing")


@pytest.mark.parametrize("method,tol", [("svd", 1e-5), ("polar_express", 1e-2)])
def test_updates_of_every_matrix_are_orthogonal(method, tol):
    """No momentum or decay: each selected kernel moves by -lr R, R orthogonal (conv
    kernels as (kh*kw*in, out)), the polar factor of its own gradient; the rest is SGD."""
    params, grads = _params(), _grads(_params(), 1)
    tx = sc.nog_optimizer(0.1, momentum=0.0, weight_decay=0.0, polar_method=method)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path in MATRICES:
        u = np.asarray(_leaf(updates, path), np.float64)
        m = u.reshape(-1, u.shape[-1]) / -0.1
        np.testing.assert_allclose(np.linalg.svd(m, compute_uv=False), 1.0, atol=tol)
        np.testing.assert_allclose(u / -0.1, _polar_f64(_leaf(grads, path)), atol=tol)
    np.testing.assert_allclose(updates["fc"]["kernel"], -0.1 * grads["fc"]["kernel"],
                               rtol=1e-6)
    np.testing.assert_allclose(updates["bn"]["scale"], -0.1 * grads["bn"]["scale"], rtol=1e-6)


def test_conv_kernel_reshape_round_trip():
    """A conv kernel's update is the polar factor of its (kh*kw*in, out) matrix mapped
    back to HWIO, the same as orthogonalising that matrix as a dense kernel."""
    g = _grads({"k": jnp.zeros((3, 3, 4, 8))}, 2)
    tx = sc.nearest_orthogonal_gradient()
    conv, _ = tx.update(g, tx.init(g))
    dense, _ = tx.update({"k": g["k"].reshape(36, 8)}, None)
    np.testing.assert_array_equal(conv["k"], dense["k"].reshape(3, 3, 4, 8))
    np.testing.assert_allclose(conv["k"], _polar_f64(g["k"]), atol=1e-5)


def _muon_dims(params):
    """optax.contrib.muon on the same matrices: HWIO conv kernels reduce over (0, 1, 2)."""
    def spec(path, x):
        name = jax.tree_util.keystr(path)
        if "kernel" in name and "fc" not in name:
            return MuonDimensionNumbers(tuple(range(x.ndim - 1)), x.ndim - 1)
        return None

    return jax.tree_util.tree_map_with_path(spec, params)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_conventions_with_muons_coefficients_are_optax_muon(nesterov):
    """nog_optimizer(conventions="muon", polar_method="muon") takes optax.contrib.muon's
    steps: momentum then Newton-Schulz, width scaling, decoupled decay, AdamW for the rest
    (measured difference 2e-8 over 4 steps)."""
    params = _params()
    ref = optax.contrib.muon(0.02, weight_decay=0.01, nesterov=nesterov,
                             muon_weight_dimension_numbers=_muon_dims)
    rest = optax.adamw(0.02, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, nesterov=nesterov)
    ours = sc.nog_optimizer(0.02, conventions="muon", polar_method="muon", weight_decay=0.01,
                            nesterov=nesterov, rest=rest)
    s_ref, s_ours = ref.init(params), ours.init(params)
    p_ref = p_ours = params
    for t in range(4):
        g = _grads(params, 10 + t)
        u_ref, s_ref = jax.jit(ref.update)(g, s_ref, p_ref)
        u_ours, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                               u_ours, u_ref)
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)


def test_muon_conventions_default_rest_is_optax_muons_adamw():
    params = _params()
    ref = optax.contrib.muon(0.02, muon_weight_dimension_numbers=_muon_dims)
    ours = sc.nog_optimizer(0.02, conventions="muon", polar_method="muon")
    g = _grads(params, 3)
    u_ref, _ = ref.update(g, ref.init(params), params)
    u_ours, _ = ours.update(g, ours.init(params), params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           u_ours, u_ref)


def test_muon_conventions_with_polar_express_orthogonalise_the_momentum():
    """The one-line switch: the same steps, with the polar factor to 1e-2 instead of
    Muon's spread; a wide kernel scaled by sqrt(out / in)."""
    params = _params()
    tx = sc.nog_optimizer(0.02, conventions="muon")
    g = _grads(params, 4)
    updates, _ = tx.update(g, tx.init(params), params)
    u = np.asarray(updates["conv2"]["kernel"], np.float64).reshape(8, 16)  # wide: 8 -> 16
    sv = np.linalg.svd(u / (-0.02 * math.sqrt(16 / 8)), compute_uv=False)
    np.testing.assert_allclose(sv, 1.0, atol=1e-2)


def test_ema_momentum_is_optax_muons():
    """ema_momentum + NOG(muon) is optax.contrib.scale_by_muon on a 2-D leaf."""
    params = {"w": jnp.zeros((6, 4))}
    ref = optax.contrib.scale_by_muon(beta=0.9, nesterov=True,
                                      weight_dimension_numbers={"w": MuonDimensionNumbers()})
    ours = optax.chain(ema_momentum(0.9, nesterov=True),
                       sc.nearest_orthogonal_gradient(method="muon"))
    s_ref, s_ours = ref.init(params), ours.init(params)
    for t in range(3):
        g = _grads(params, 20 + t)
        u_ref, s_ref = ref.update(g, s_ref)
        u_ours, s_ours = ours.update(g, s_ours)
        # float32 round-off through 15 products in another order (measured 1.7e-6)
        np.testing.assert_allclose(u_ours["w"], u_ref["w"], atol=1e-5)


def test_scale_by_shape_is_muons_width_scaling():
    u = {"wide": jnp.ones((1, 1, 2, 8)), "tall": jnp.ones((3, 3, 4, 8))}
    out, _ = scale_by_shape().update(u, None)
    np.testing.assert_allclose(out["wide"], 2.0)  # sqrt(8 / 2)
    np.testing.assert_allclose(out["tall"], 1.0)  # max(1, 8 / 36)


def test_per_layer_olr_eta_is_eq20_and_inside_its_proven_range(x64):
    """Each kernel has its own eta = Eq. 20-21 on (W, polar(g)); when eta* > 0,
    eta* <= |W|_F / (2 sqrt(2) |R|_F) (AM-GM on Eq. 20's denominator), which is the
    corrected Proposition 1 bound 1/(2 sqrt 2) for orthogonal W."""
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), _params())
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(16, 12)))
    params["dense"]["kernel"] = jnp.asarray(q)  # an orthogonal kernel
    lr = 10.0  # a cap above every eta*, so that eta = eta* wherever eta* > 0
    tx = sc.nog_optimizer(lr, olr=True, momentum=0.0, weight_decay=0.0, polar_method="svd")
    for seed in range(6):
        g = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), _grads(params, seed))
        g["dense"]["kernel"] = g["dense"]["kernel"] + 3.0 * params["dense"]["kernel"]
        _, state = tx.update(g, tx.init(params), params)
        etas = np.asarray(sc.find_olr_eta(state))  # tree-leaf order: conv1, conv2, dense
        assert etas.shape == (3,)
        for eta, path in zip(etas, MATRICES, strict=True):
            w, r = np.asarray(_leaf(params, path)).ravel(), _polar_f64(_leaf(g, path)).ravel()
            star = (w @ w) * (r @ w) / ((w @ w) * (r @ r) + 2 * (r @ w) ** 2)
            np.testing.assert_allclose(eta, star if 0 < star < lr else lr, rtol=1e-10)
            if star > 0:
                assert star <= np.linalg.norm(w) / (2 * math.sqrt(2) * np.linalg.norm(r))
        assert 0 < etas[2] <= 1 / (2 * math.sqrt(2))  # orthogonal W, <R, W> > 0


def test_per_layer_olr_with_muon_conventions():
    params = _params()
    tx = sc.nog_optimizer(0.02, conventions="muon", olr=True)
    updates, state = tx.update(_grads(params, 6), tx.init(params), params)
    etas = np.asarray(sc.find_olr_eta(state))
    assert etas.shape == (3,) and np.all((etas > 0) & (etas <= 0.02 * (1 + 1e-6)))
    with pytest.raises(ValueError, match="shape_scale=True with olr=True"):
        sc.nog_optimizer(0.02, conventions="muon", olr=True, shape_scale=True)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="conventions"):
        sc.nog_optimizer(0.1, conventions="adam")
    with pytest.raises(ValueError, match="orthogonalize"):
        sc.nog_optimizer(0.1, orthogonalize="weights")
    with pytest.raises(ValueError, match="polar_express"):
        sc.nog_optimizer(0.1, polar_rtol=0.0)  # polar_express cannot turn its cut off
    with pytest.raises(TypeError, match="rest must be an optax.GradientTransformation"):
        sc.nog_optimizer(0.1, rest="adamw")
    with pytest.raises(ValueError, match="momentum"):
        sc.nog_optimizer(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="already scaled by scale_by_adam"):
        sc.nog_optimizer(0.1, rest=optax.chain(optax.scale_by_adam(),
                                               sc.optimal_learning_rate(0.1)))
