"""Tests for svdcond_jax.orthogonal: polar factor (Eqs. 14-17), Eq. 12 loss, Eq. 13 expm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdcond_jax.orthogonal import (
    as_matrix,
    orthogonality_loss,
    polar_factor,
    skew_symmetric_expm,
)

SHAPES = [(6, 6), (9, 4), (4, 9), (27, 16), (16, 27)]


def _polar_f64(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return u @ vt


def _with_kappa(rng: np.random.Generator, rows: int, cols: int, kappa: float) -> np.ndarray:
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.normal(size=(rows, k)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, k)))
    return (u * np.logspace(0, -np.log10(kappa), k)) @ v.T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_svd_polar_matches_numpy_and_has_unit_singular_values(shape, seed):
    m = np.random.default_rng(seed).normal(size=shape)
    r = polar_factor(jnp.asarray(m, jnp.float32))
    chex.assert_shape(r, shape)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(r, np.float64), compute_uv=False), 1.0,
                               atol=2e-6)
    np.testing.assert_allclose(r, _polar_f64(m), atol=2e-5)


def test_polar_is_nearest_orthogonal_matrix():
    rng = np.random.default_rng(3)
    m = rng.normal(size=(5, 5))
    r = np.asarray(polar_factor(jnp.asarray(m, jnp.float32)), np.float64)
    for _ in range(20):  # Eq. 14: no other orthogonal matrix is closer
        q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
        assert np.linalg.norm(m - r) <= np.linalg.norm(m - q) + 1e-5


def test_polar_batched(x64):
    m = np.random.default_rng(4).normal(size=(3, 7, 5))
    r = polar_factor(jnp.asarray(m))
    for i in range(3):
        np.testing.assert_allclose(r[i], _polar_f64(m[i]), atol=1e-10)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_zero_matrix_gives_zero(method):
    r = polar_factor(jnp.zeros((4, 6)), method=method)
    chex.assert_tree_all_finite(r)
    np.testing.assert_array_equal(r, 0.0)


@pytest.mark.parametrize("shape", [(16, 16), (9, 32), (32, 9)])
@pytest.mark.parametrize("kappa", [10.0, 100.0])
def test_newton_schulz_accuracy(shape, kappa):
    """Measured accuracy claim of polar_factor's docstring: 20 iters suffice to kappa 100."""
    m = _with_kappa(np.random.default_rng(5), *shape, kappa)
    r = polar_factor(jnp.asarray(m, jnp.float32), method="newton_schulz", num_iters=20)
    sv = np.linalg.svd(np.asarray(r, np.float64), compute_uv=False)
    assert np.abs(sv - 1).max() < 1e-5
    np.testing.assert_allclose(r, _polar_f64(m), atol=1e-4)


def test_newton_schulz_converges_monotonically_with_iterations():
    m = _with_kappa(np.random.default_rng(6), 16, 16, 1e3)
    errs = []
    for iters in (5, 15, 25, 40):
        r = polar_factor(jnp.asarray(m, jnp.float32), method="newton_schulz", num_iters=iters)
        errs.append(np.abs(np.linalg.svd(np.asarray(r, np.float64), compute_uv=False) - 1).max())
    assert errs == sorted(errs, reverse=True)
    assert errs[0] > 0.5 and errs[-1] < 1e-5


def test_polar_factor_bad_input():
    with pytest.raises(ValueError, match="ndim"):
        polar_factor(jnp.zeros(3))
    with pytest.raises(ValueError, match="method"):
        polar_factor(jnp.zeros((2, 2)), method="qr")


def test_polar_factor_jit():
    m = jnp.asarray(np.random.default_rng(7).normal(size=(6, 4)), jnp.float32)
    for method in ("svd", "newton_schulz"):
        f = jax.jit(lambda x, method=method: polar_factor(x, method=method))
        np.testing.assert_allclose(f(m), _polar_f64(np.asarray(m)), atol=1e-4)


def test_as_matrix_roundtrip():
    x = jnp.arange(3 * 3 * 2 * 5.0).reshape(3, 3, 2, 5)
    m, back = as_matrix(x)
    chex.assert_shape(m, (18, 5))
    np.testing.assert_array_equal(back(m), x)
    with pytest.raises(ValueError, match="ndim"):
        as_matrix(jnp.zeros(4))


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (3, 3, 3, 16), (1, 1, 8, 4)])
def test_orthogonality_loss_zero_on_orthogonal_and_matches_numpy(shape):
    rng = np.random.default_rng(8)
    k = int(np.prod(shape[:-1]))
    q = _polar_f64(rng.normal(size=(k, shape[-1]))).reshape(shape)
    assert float(orthogonality_loss(jnp.asarray(q, jnp.float32))) < 1e-5
    w = rng.normal(size=shape)
    m = w.reshape(k, shape[-1])
    gram = m.T @ m if shape[-1] <= k else m @ m.T  # the Gram that can reach I
    expected = np.linalg.norm(gram - np.eye(gram.shape[0]))
    np.testing.assert_allclose(orthogonality_loss(jnp.asarray(w, jnp.float32)), expected,
                               rtol=1e-5)


def test_skew_symmetric_expm_is_orthogonal():
    a = jnp.asarray(np.random.default_rng(9).normal(size=(2, 6, 6)), jnp.float32)
    q = skew_symmetric_expm(a)
    for i in range(2):
        np.testing.assert_allclose(q[i] @ q[i].T, np.eye(6), atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        skew_symmetric_expm(jnp.zeros((2, 3)))
