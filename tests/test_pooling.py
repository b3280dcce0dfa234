"""Tests for the covariance pooling (GCP) head (Eq. 44, docs/applications.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdcond_jax.nn import CovariancePooling, covariance_sqrt_features, upper_triangle

KEY = jax.random.key(0, impl="rbg")  # rbg: compiles much faster than threefry on CPU
# A low-precision output is the float32 result rounded once: within eps(dtype) relative,
# plus float32 round-off (two differently compiled programs) relative to the output scale.
_ROUNDOFF = 1e-5


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _sqrtm64(p: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh(p)
    return (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T


def test_upper_triangle_is_row_major_with_diagonal():
    m = jnp.arange(9.0).reshape(3, 3)
    np.testing.assert_array_equal(upper_triangle(m), [0, 1, 2, 4, 5, 8])
    shape = jax.eval_shape(upper_triangle, jax.ShapeDtypeStruct((2, 256, 256), jnp.float32))
    assert shape.shape == (2, 32896)


@pytest.mark.parametrize("seed,shape", [(0, (2, 5, 5, 4)), (1, (3, 4, 6, 7))])
def test_covariance_sqrt_features_matches_float64_reference(x64, seed, shape):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float64)
    out = np.asarray(jax.jit(covariance_sqrt_features)(x))
    batch, height, width, dim = shape
    rows, cols = np.triu_indices(dim)
    for b in range(batch):
        feats = np.asarray(x[b]).reshape(height * width, dim).T
        feats = feats - feats.mean(1, keepdims=True)
        expected = _sqrtm64(feats @ feats.T / (height * width))
        np.testing.assert_allclose(out[b], expected[rows, cols], rtol=1e-6, atol=1e-8)


def test_rank_deficient_gcp_shape_forward_and_gradient_are_finite():
    """dim 256 from a 7x7 map: 49 samples per image, covariance rank <= 48 (GCP case)."""
    x = _normal(0, (2, 7, 7, 16))
    head = CovariancePooling(dim=256)
    variables = jax.jit(lambda x: head.init(KEY, x, use_running_average=True))(x)
    assert variables["params"]["pre_svd_conv"]["kernel"].shape == (1, 1, 16, 256)
    assert set(variables["params"]) == {"pre_svd_conv", "bn"}

    @jax.jit
    def loss(params, x):
        out, _ = head.apply({**variables, "params": params}, x, use_running_average=False,
                            mutable=["batch_stats"])
        return jnp.sum(out[:, ::97]), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    assert out.shape == (2, 32896)
    assert np.all(np.isfinite(np.asarray(out)))
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    assert float(jnp.abs(grads[0]["pre_svd_conv"]["kernel"]).max()) > 0.0


def test_pre_svd_features_are_what_the_meta_layer_decomposes():
    x = _normal(2, (2, 3, 3, 5))
    head = CovariancePooling(dim=4)
    variables = jax.jit(lambda x: head.init(KEY, x, use_running_average=True))(x)
    out, state = jax.jit(lambda v, x: head.apply(
        v, x, use_running_average=False, mutable=["batch_stats", "intermediates"]))(variables, x)
    (sown,) = state["intermediates"]["pre_svd_features"]
    # Train-mode BN with scale 1 / bias 0, then ReLU, of the 1x1 conv output.
    conv = x @ variables["params"]["pre_svd_conv"]["kernel"][0, 0]
    mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    expected = np.maximum((conv - mean) / np.sqrt(var + 1e-5), 0.0)
    np.testing.assert_allclose(sown, expected, rtol=1e-4, atol=1e-4)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("pre_svd", ["sn", "ow"])
def test_pre_svd_treatments_keep_the_kernel_name(pre_svd):
    x = _normal(3, (2, 4, 4, 6))
    head = CovariancePooling(dim=8, pre_svd=pre_svd, method="newton_schulz")
    variables = jax.jit(lambda x: head.init(KEY, x, use_running_average=True))(x)
    assert "kernel" in variables["params"]["pre_svd_conv"]
    out, _ = jax.jit(lambda v, x: head.apply(v, x, use_running_average=False,
                                             mutable=["batch_stats"]))(variables, x)
    assert out.shape == (2, 36)
    assert np.all(np.isfinite(np.asarray(out)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="pre_svd"):
        CovariancePooling(dim=4, pre_svd="ol")
    with pytest.raises(ValueError, match="x.shape"):
        covariance_sqrt_features(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="at least 2 positions"):
        covariance_sqrt_features(jnp.ones((2, 1, 1, 4)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_is_low_precision_out(dtype):
    x = _normal(4, (2, 4, 4, 6)).astype(dtype)
    assert covariance_sqrt_features(x).dtype == dtype
    head = CovariancePooling(dim=4, param_dtype=jnp.bfloat16)
    variables = jax.jit(lambda x: head.init(KEY, x, use_running_average=True))(x)
    assert variables["params"]["pre_svd_conv"]["kernel"].dtype == jnp.bfloat16
    assert variables["params"]["bn"]["scale"].dtype == jnp.bfloat16
    out, _ = jax.jit(lambda v, x: head.apply(v, x, use_running_average=False,
                                             mutable=["batch_stats"]))(variables, x)
    assert out.dtype == dtype
    # Computed in float32: the float32 result on the same input, rounded once to dtype.
    ref, _ = head.apply(variables, x.astype(jnp.float32), use_running_average=False,
                        mutable=["batch_stats"])
    assert ref.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), ref,
                               rtol=float(jnp.finfo(dtype).eps),
                               atol=_ROUNDOFF * float(np.abs(ref).max()))


def test_use_running_average_attribute_or_call_argument():
    x = _normal(5, (2, 3, 3, 4))
    head = CovariancePooling(dim=3, use_running_average=True)
    variables = jax.jit(lambda x: head.init(KEY, x))(x)
    y_eval = head.apply(variables, x)
    y_call = CovariancePooling(dim=3).apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, y_call, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="use_running_average"):
        CovariancePooling(dim=3).apply(variables, x)
