"""Tests for the Pre-SVD weight treatments: SN (Eq. 11), OW dense (Eq. 13), SOC."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdcond_jax.nn.orthogonal_layers import (
    OrthogonalDense,
    SkewOrthogonalConv,
    SpectralNormConv,
    conv_transpose_kernel,
    fantastic_four_matrices,
    power_iteration,
)

KEY = jax.random.key(0)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _init(layer, x):
    # Eager on purpose: per-primitive compiles are cached across tests with equal shapes,
    # while a jitted init recompiles the (slow to compile) random kernels every time.
    return layer.init(KEY, x, train=False)


def _apply(layer):
    return layer.apply


# ------------------------------------------------------------------------------ SOC


def test_soc_variables_and_param_paths():
    layer = SkewOrthogonalConv(4)
    v = _init(layer, _x((1, 4, 4, 2)))
    assert jax.tree_util.tree_map(jnp.shape, v["params"]) == {"kernel": (3, 3, 4, 4)}
    assert jax.tree_util.tree_map(jnp.shape, v["batch_stats"]) == {
        "u1": (12,), "u2": (12,), "u3": (36,), "u4": (4,)}
    np.testing.assert_allclose(np.std(np.asarray(v["params"]["kernel"])), 1 / np.sqrt(4), rtol=0.3)


@pytest.mark.parametrize("cin,cout,k", [(2, 4, 3), (4, 4, 1)])
def test_soc_is_norm_preserving(cin, cout, k):
    layer = SkewOrthogonalConv(cout, kernel_size=(k, k))
    x = _x((2, 4, 4, cin))
    v = _init(layer, x)
    apply = _apply(layer)
    y = apply(v, x, train=False)
    chex.assert_shape(y, (2, 4, 4, cout))
    np.testing.assert_allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5)
    y_train, _ = apply(v, x, train=True, mutable="batch_stats")  # T = 5
    np.testing.assert_allclose(jnp.linalg.norm(y_train), jnp.linalg.norm(x), rtol=2e-3)


@pytest.mark.parametrize("cin,cout", [(4, 4), (2, 4), (4, 2)])
def test_soc_jacobian_is_orthogonal(cin, cout):
    layer = SkewOrthogonalConv(cout)
    x = _x((1, 4, 4, cin))
    v = _init(layer, x)
    jac = jax.jacobian(lambda z: layer.apply(v, z, train=False))(x)
    jac = np.asarray(jac, np.float64).reshape(16 * cout, 16 * cin)
    if cout >= cin:  # zero-padded input: orthonormal columns
        np.testing.assert_allclose(jac.T @ jac, np.eye(16 * cin), atol=2e-5)
    else:  # sliced output: orthonormal rows
        np.testing.assert_allclose(jac @ jac.T, np.eye(16 * cout), atol=2e-5)
    assert np.abs(jac).max() > 0.05  # not trivially the identity


def _conv(z, k):
    return jax.lax.conv_general_dilated(z, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


_conv_jacobian = jax.jit(jax.jacobian(_conv))  # one compile for all kernels of one shape


def test_soc_operator_is_exactly_skew_symmetric():
    """conv with L = (P - P^T)/2, P^T = conv_transpose_kernel(P), is a skew operator."""
    p = _x((3, 3, 4, 4), seed=4)
    skew = 0.5 * (p - conv_transpose_kernel(p))
    jac = np.asarray(_conv_jacobian(jnp.zeros((1, 4, 4, 4)), skew), np.float64).reshape(64, 64)
    np.testing.assert_allclose(jac, -jac.T, atol=1e-6)
    assert np.abs(jac).max() > 0.1


def test_fantastic_four_bound_holds():
    rng = np.random.default_rng(0)
    for _ in range(4):
        k = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) * rng.normal(size=4) ** 2, jnp.float32)
        jac = np.asarray(_conv_jacobian(jnp.zeros((1, 4, 4, 4)), k), np.float64)
        exact = np.linalg.norm(jac.reshape(64, 64), 2)
        bounds = [3.0 * np.linalg.norm(np.asarray(r, np.float64), 2)
                  for r in fantastic_four_matrices(k)]
        assert exact <= min(bounds) * (1 + 1e-5)


def test_soc_power_vectors_update_only_in_training():
    layer = SkewOrthogonalConv(4)
    x = _x((1, 4, 4, 4))
    v = _init(layer, x)
    _, new = layer.apply(v, x, train=True, mutable=["batch_stats"])
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                     v["batch_stats"], new["batch_stats"])
    assert any(jax.tree_util.tree_leaves(changed))
    _, same = layer.apply(v, x, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(same["batch_stats"], v["batch_stats"])


def test_soc_rejects_stride_and_even_kernel():
    x = _x((1, 4, 4, 2))
    with pytest.raises(ValueError, match="stride"):
        SkewOrthogonalConv(2, strides=2).init(KEY, x, train=False)
    with pytest.raises(ValueError, match="odd"):
        SkewOrthogonalConv(2, kernel_size=(2, 2)).init(KEY, x, train=False)


def test_soc_gradient_flows_to_raw_kernel():
    layer = SkewOrthogonalConv(4)
    x = _x((1, 4, 4, 4))
    v = _init(layer, x)
    loss = lambda p: jnp.sum(layer.apply({**v, "params": p}, x, train=False)[..., 0])
    g = jax.grad(loss)(v["params"])
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g["kernel"]).max()) > 0


# ------------------------------------------------------------------------------ OW dense


@pytest.mark.parametrize("cin,cout", [(4, 4), (3, 6), (6, 3)])
def test_orthogonal_dense_weight_is_orthogonal(cin, cout):
    layer = OrthogonalDense(cout)
    x = _x((5, cin))
    v = _init(layer, x)
    assert jax.tree_util.tree_map(jnp.shape, v["params"]) == {"kernel": (max(cin, cout),) * 2}
    w = np.asarray(layer.apply(v, jnp.eye(cin), train=False), np.float64)  # rows of W
    chex.assert_shape(w, (cin, cout))
    if cin <= cout:
        np.testing.assert_allclose(w @ w.T, np.eye(cin), atol=1e-5)
    else:
        np.testing.assert_allclose(w.T @ w, np.eye(cout), atol=1e-5)
    y = layer.apply(v, x, train=True)
    np.testing.assert_allclose(y, np.asarray(x) @ w, atol=1e-5)


# ------------------------------------------------------------------------------ SN


def test_power_iteration_matches_svd():
    m = _x((12, 5), seed=3)
    _, sigma = power_iteration(m, jnp.ones(5) / np.sqrt(5), 100)
    np.testing.assert_allclose(sigma, np.linalg.norm(np.asarray(m, np.float64), 2), rtol=1e-5)


def test_spectral_norm_conv_variables_and_sigma():
    layer = SpectralNormConv(8, (3, 3), use_bias=True)
    x = _x((2, 6, 6, 3))
    v = _init(layer, x)
    assert jax.tree_util.tree_map(jnp.shape, v) == {
        "params": {"kernel": (3, 3, 3, 8), "bias": (8,)}, "batch_stats": {"u": (8,)}}
    apply = _apply(layer)
    for _ in range(30):  # power iteration converges over training calls
        _, new = apply(v, x, train=True, mutable="batch_stats")
        v = {**v, **new}
    kernel = np.asarray(v["params"]["kernel"], np.float64).reshape(27, 8)
    _, sigma = power_iteration(jnp.asarray(kernel, jnp.float32), v["batch_stats"]["u"], 0)
    effective = kernel / float(sigma)
    np.testing.assert_allclose(np.linalg.norm(effective, 2), 1.0, rtol=1e-4)
    # the layer computes conv(x, effective kernel) + bias
    y = apply(v, x, train=False)
    ref = jax.lax.conv_general_dilated(x, jnp.asarray(effective.reshape(3, 3, 3, 8), jnp.float32),
                                       (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y, ref + v["params"]["bias"], atol=1e-5)


def test_spectral_norm_conv_strides():
    layer = SpectralNormConv(4, 3, strides=2)
    x = _x((1, 8, 8, 2))
    v = _init(layer, x)
    chex.assert_shape(layer.apply(v, x, train=False), (1, 4, 4, 4))
