"""Tests for the SVD meta-layer (Eqs. 1-8; docs/conditioning.md and docs/meta_layer.md)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from svdcond_jax import (
    METHODS,
    condition_number,
    condition_number_f64,
    covariance,
    eigvalsh_f64,
    inv_sqrtm,
    sqrtm,
    sqrtm_and_inv_sqrtm,
)
from svdcond_jax.solvers.eigh import taylor_geometric_sum

# Iteration counts at which the approximate solvers are accurate to ~1e-10 on the
# moderately conditioned test matrices (kappa <= 20).
CONVERGED = {"newton_schulz": {"num_iters": 30}, "pade": {"lyapunov_iters": 20}}


def random_spd(rng: np.random.Generator, d: int, kappa: float, batch=()) -> np.ndarray:
    """Float64 SPD batch with eigenvalues geometrically spaced in [1/kappa, 1]."""
    q, _ = np.linalg.qr(rng.normal(size=(*batch, d, d)))
    lam = np.geomspace(1.0, 1.0 / kappa, d)
    return (q * lam) @ np.swapaxes(q, -1, -2)


def np_power(p: np.ndarray, power: float) -> np.ndarray:
    """Float64 NumPy reference P^power via eigh."""
    w, v = np.linalg.eigh(p)
    return (v * w[..., None, :] ** power) @ np.swapaxes(v, -1, -2)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------ forward


def test_covariance_matches_eq2():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 17))
    n = x.shape[-1]
    j = (np.eye(n) - np.ones((n, n)) / n) / n
    expected = x @ j @ np.swapaxes(x, -1, -2) + 0.1 * np.eye(5)
    got = covariance(jnp.asarray(x, jnp.float32), eps=0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d,kappa", [(4, 3.0), (16, 1e2), (32, 1e4)])
def test_eigh_forward_matches_float64_numpy(x64, d, kappa):
    rng = np.random.default_rng(d)
    p = random_spd(rng, d, kappa, batch=(2, 3))
    q, s = sqrtm_and_inv_sqrtm(jnp.asarray(p))
    np.testing.assert_allclose(q, np_power(p, 0.5), atol=1e-12)
    np.testing.assert_allclose(s, np_power(p, -0.5), rtol=1e-10, atol=1e-10 * kappa**0.5)
    eye = np.eye(d)
    np.testing.assert_allclose(q @ q, p, atol=1e-12)
    np.testing.assert_allclose(s @ jnp.asarray(p) @ s, np.broadcast_to(eye, p.shape), atol=1e-9)
    np.testing.assert_allclose(q @ s, np.broadcast_to(eye, p.shape), atol=1e-9)
    for a in (q, s):
        np.testing.assert_allclose(a, np.swapaxes(a, -1, -2), atol=1e-12 * float(np.abs(a).max()))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_float32_forward(method):
    """float32, kappa = 20: all methods agree with float64 NumPy (Pade/NS at their accuracy)."""
    rng = np.random.default_rng(1)
    p = random_spd(rng, 8, 20.0, batch=(4,))
    opts = {"num_iters": 20} if method == "newton_schulz" else {}
    q, s = sqrtm_and_inv_sqrtm(jnp.asarray(p, jnp.float32), method=method, **opts)
    assert q.dtype == s.dtype == jnp.float32
    tol = {"pade": (1e-2, 5e-2)}.get(method, (1e-5, 1e-4))  # [5/5] Pade: see module doc
    assert rel_err(q, np_power(p, 0.5)) < tol[0]
    assert rel_err(s, np_power(p, -0.5)) < tol[1]
    np.testing.assert_allclose(sqrtm(jnp.asarray(p, jnp.float32), method=method, **opts), q)


def test_rank_deficient_forward_is_finite_and_clamped():
    """GCP case (docs/conditioning.md): N < d gives a singular covariance."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 5))
    p = covariance(x)
    q, s = sqrtm_and_inv_sqrtm(p)
    assert np.isfinite(np.asarray(s)).all() and np.isfinite(np.asarray(q)).all()
    # Clamped at eps * lambda_max: the inverse sqrt is at most (eps * lambda_max)^{-1/2}.
    lam_max = eigvalsh_f64(p)[..., -1]
    bound = (np.finfo(np.float32).eps * lam_max) ** -0.5
    assert (np.linalg.norm(np.asarray(s, np.float64), 2, axis=(-2, -1)) <= 1.01 * bound).all()
    s_raw = inv_sqrtm(p, eig_floor=0.1)
    assert np.linalg.norm(np.asarray(s_raw[0]), 2) <= 1.01 * (0.1 * lam_max[0]) ** -0.5


# --------------------------------------------------------------------------- gradients


def _loss(fn, g1, g2):
    """Scalar loss using both outputs so both cotangents are non-trivial."""

    def loss(p):
        q, s = fn(p)
        return jnp.sum(g1 * q) + jnp.sum(g2 * s)

    return loss


@pytest.mark.parametrize(
    "method,opts",
    [("eigh", {}), ("eigh", {"backward": "taylor"}), ("eigh_autodiff", {}),
     ("newton_schulz", {"num_iters": 6})],
)
def test_check_grads_exact_methods(x64, method, opts):
    """Reverse-mode gradients vs finite differences of the method's own forward, float64."""
    rng = np.random.default_rng(2)
    p = jnp.asarray(random_spd(rng, 5, 10.0))
    g1, g2 = (jnp.asarray(rng.normal(size=(5, 5))) for _ in range(2))
    loss = _loss(lambda a: sqrtm_and_inv_sqrtm(a, method=method, **opts), g1, g2)
    check_grads(loss, (p,), order=1, modes=["rev"], atol=1e-7, rtol=1e-7, eps=1e-6)


def test_check_grads_pade_against_own_forward(x64):
    """Pade's Lyapunov backward is the exact derivative of the *exact* sqrt evaluated at the
    Pade forward, so it matches finite differences of its own forward only as far as the
    [5/5] Pade forward is exact: kappa = 1.5 keeps z = 1 - lambda/||P||_F <= 0.8, where the
    approximant's error is ~1e-7; tolerance 1e-4 documents that gap honestly."""
    rng = np.random.default_rng(3)
    p = jnp.asarray(random_spd(rng, 4, 1.5))
    g1, g2 = (jnp.asarray(rng.normal(size=(4, 4))) for _ in range(2))
    loss = _loss(lambda a: sqrtm_and_inv_sqrtm(a, method="pade", lyapunov_iters=20), g1, g2)
    check_grads(loss, (p,), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


def test_exact_backward_equals_central_finite_differences(x64):
    rng = np.random.default_rng(4)
    p = jnp.asarray(random_spd(rng, 6, 1e3))
    g1, g2 = (jnp.asarray(rng.normal(size=(6, 6))) for _ in range(2))
    loss = jax.jit(_loss(sqrtm_and_inv_sqrtm, g1, g2))
    grad = jax.jit(jax.grad(loss))(p)
    assert np.allclose(grad, grad.T, atol=1e-12)
    for seed in range(3):
        v = np.random.default_rng(seed).normal(size=(6, 6))
        v = jnp.asarray((v + v.T) / 2)
        h = 1e-7
        fd = (loss(p + h * v) - loss(p - h * v)) / (2 * h)
        np.testing.assert_allclose(jnp.sum(grad * v), fd, rtol=1e-6)


@pytest.mark.parametrize("fn", [sqrtm, inv_sqrtm])
def test_taylor_backward_agrees_with_exact_on_separated_spectrum(x64, fn):
    """Eigenvalue ratios <= 0.9 between neighbours: 0.9^101 ~ 2e-5 truncation error."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    p = jnp.asarray((q * 0.5 ** np.arange(6)) @ q.T)
    g = jnp.asarray(rng.normal(size=(6, 6)))
    exact = jax.grad(lambda a: jnp.sum(g * fn(a)))(p)
    taylor = jax.grad(lambda a: jnp.sum(g * fn(a, backward="taylor")))(p)
    assert rel_err(taylor, exact) < 1e-10
    # ... and is biased (not exact) when two eigenvalues nearly coincide.
    p_close = jnp.asarray((q * np.array([1.0, 0.999, 0.5, 0.3, 0.2, 0.1])) @ q.T)
    exact = jax.grad(lambda a: jnp.sum(g * fn(a)))(p_close)
    taylor = jax.grad(lambda a: jnp.sum(g * fn(a, backward="taylor")))(p_close)
    assert rel_err(taylor, exact) > 1e-3


def test_taylor_geometric_sum_equals_truncated_series(x64):
    p = jnp.asarray([0.0, 1e-8, 0.3, 0.9, 0.999, 1 - 1e-12, 1.0])
    expected = sum(np.asarray(p) ** k for k in range(101))
    np.testing.assert_allclose(taylor_geometric_sum(p, 100), expected, rtol=1e-10)


def _degenerate_inputs() -> dict[str, jax.Array]:
    x = np.random.default_rng(6).normal(size=(5, 3))
    q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(5, 5)))
    lam = np.array([2.0, 2.0, 2.0, 1.0, 0.5])
    return {
        "identity": jnp.eye(5),
        "exact_ties": jnp.diag(jnp.asarray(lam)),
        "rotated_ties": jnp.asarray((q * lam) @ q.T),  # ties broken at float32 rounding
        "rank_deficient": covariance(jnp.asarray(x)),  # N = 3 < d = 5
    }


def _grad(p, method, **opts):
    g1, g2 = (jnp.asarray(np.random.default_rng(k).normal(size=(5, 5)), p.dtype)
              for k in (8, 9))
    loss = _loss(lambda a: sqrtm_and_inv_sqrtm(a, method=method, **opts), g1, g2)
    return jax.jit(jax.grad(loss))(p)


@pytest.mark.parametrize("case", ["identity", "exact_ties", "rotated_ties", "rank_deficient"])
@pytest.mark.parametrize(
    "method,opts",
    [("eigh", {}), ("eigh", {"backward": "taylor"}), ("newton_schulz", {}), ("pade", {})],
)
def test_degenerate_gradients_are_finite(case, method, opts):
    p = _degenerate_inputs()[case].astype(jnp.float32)
    chex.assert_tree_all_finite(_grad(p, method, **opts))


@pytest.mark.parametrize("case", ["identity", "exact_ties"])
def test_plain_autodiff_through_eigh_is_nan_at_ties(case):
    """Why the custom_vjp exists: autodiff divides by lambda_i - lambda_j = 0."""
    p = _degenerate_inputs()[case].astype(jnp.float32)
    assert np.isnan(np.asarray(_grad(p, "eigh_autodiff"))).all()
    chex.assert_tree_all_finite(_grad(p, "eigh"))


def test_plain_autodiff_through_eigh_is_wrong_at_near_ties(x64):
    """Ties broken by float32 rounding: autodiff is finite but far from the exact gradient
    (float64 reference: the exact closed form, itself checked against finite differences)."""
    p = _degenerate_inputs()["rotated_ties"]
    reference = _grad(p, "eigh")
    p32 = p.astype(jnp.float32)  # explicit float32 computations stay float32 under x64
    assert _grad(p32, "eigh").dtype == jnp.float32
    assert rel_err(_grad(p32, "eigh"), reference) < 1e-5
    assert rel_err(_grad(p32, "eigh_autodiff"), reference) > 1e-2


def test_exact_gradient_at_identity_is_the_isotropic_limit(x64):
    """At P = c I, d sqrt(P)[V] = V / (2 sqrt c) and d P^{-1/2}[V] = -V / (2 c^{3/2})."""
    g = jnp.asarray(np.random.default_rng(10).normal(size=(4, 4)))
    c = 4.0
    grad_q = jax.grad(lambda a: jnp.sum(g * sqrtm(a)))(c * jnp.eye(4))
    grad_s = jax.grad(lambda a: jnp.sum(g * inv_sqrtm(a)))(c * jnp.eye(4))
    sym_g = (g + g.T) / 2
    np.testing.assert_allclose(grad_q, sym_g / (2 * c**0.5), atol=1e-12)
    np.testing.assert_allclose(grad_s, -sym_g / (2 * c**1.5), atol=1e-12)


# ---------------------------------------------------------- convergence of iterations


def test_newton_schulz_converges_monotonically(x64):
    rng = np.random.default_rng(11)
    p = random_spd(rng, 8, 50.0)
    errs = [rel_err(sqrtm(jnp.asarray(p), method="newton_schulz", num_iters=n), np_power(p, 0.5))
            for n in (1, 2, 4, 8, 16, 32)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False) if a > 1e-13), errs
    assert errs[-1] < 1e-10


def test_pade_lyapunov_backward_converges_monotonically(x64):
    rng = np.random.default_rng(12)
    p = jnp.asarray(random_spd(rng, 8, 2.0))
    g = jnp.asarray(rng.normal(size=(8, 8)))
    exact = jax.grad(lambda a: jnp.sum(g * sqrtm(a)))(p)
    errs = [rel_err(jax.grad(lambda a, n=n: jnp.sum(g * sqrtm(a, method="pade",
                                                              lyapunov_iters=n)))(p), exact)
            for n in (1, 2, 4, 8)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-4  # limited by the [5/5] Pade forward, not the iteration


# -------------------------------------------------------- transformations and dtypes


class TestTransformations(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_variants_match_numpy(self):
        rng = np.random.default_rng(13)
        p = random_spd(rng, 6, 10.0, batch=(3,))
        fn = self.variant(lambda a: sqrtm_and_inv_sqrtm(a, method="eigh"))
        q, s = fn(jnp.asarray(p, jnp.float32))
        np.testing.assert_allclose(q, np_power(p, 0.5), atol=1e-5)
        np.testing.assert_allclose(s, np_power(p, -0.5), atol=1e-4)

    def test_vmap_matches_batch(self):
        p = jnp.asarray(random_spd(np.random.default_rng(14), 5, 10.0, batch=(4,)), jnp.float32)
        for method in METHODS:
            chex.assert_trees_all_close(jax.vmap(lambda a, m=method: inv_sqrtm(a, method=m))(p),
                                        inv_sqrtm(p, method=method), atol=1e-5, rtol=1e-5)

    def test_multiple_batch_dims_and_grad_under_jit(self):
        p = jnp.asarray(random_spd(np.random.default_rng(15), 4, 5.0, batch=(2, 3)), jnp.float32)
        for method in METHODS:
            grad = jax.jit(jax.grad(lambda a, m=method: jnp.sum(sqrtm(a, method=m) ** 2)))(p)
            chex.assert_shape(grad, p.shape)
            chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_low_precision_out(dtype):
    p = jnp.asarray(random_spd(np.random.default_rng(16), 4, 4.0), dtype)
    for method in METHODS:
        q, s = sqrtm_and_inv_sqrtm(p, method=method)
        assert q.dtype == s.dtype == dtype
        assert rel_err(q, np_power(np.asarray(p, np.float64), 0.5)) < 2e-2
    assert covariance(jnp.ones((3, 4), dtype)).dtype == dtype


def test_float64_stays_float64(x64):
    p = jnp.asarray(random_spd(np.random.default_rng(17), 4, 4.0))
    for method in METHODS:
        assert sqrtm(p, method=method).dtype == jnp.float64


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("shape", [(3,), (), (2, 3), (4, 2, 3)])
def test_bad_shapes_raise_at_trace_time(shape):
    for fn in (sqrtm, inv_sqrtm, sqrtm_and_inv_sqrtm, condition_number):
        with pytest.raises(ValueError, match=r"p\.shape="):
            jax.jit(fn)(jnp.ones(shape))
    with pytest.raises(ValueError, match=r"p\.shape"):
        condition_number_f64(np.ones(shape))


def test_bad_methods_and_options_raise():
    p = jnp.eye(3)
    with pytest.raises(ValueError, match="valid methods"):
        sqrtm(p, method="svd")
    with pytest.raises(ValueError, match="does not take"):
        sqrtm(p, method="newton_schulz", lyapunov_iters=3)
    with pytest.raises(ValueError, match="does not take"):
        sqrtm(p, method="eigh", num_iters=3)
    with pytest.raises(ValueError, match="backward"):
        sqrtm(p, backward="pade")
    with pytest.raises(ValueError, match="num_iters"):
        sqrtm(p, method="newton_schulz", num_iters=0)
    with pytest.raises(ValueError, match="eig_floor"):
        sqrtm(p, eig_floor=-1.0)
    with pytest.raises(ValueError, match="x.shape"):
        covariance(jnp.ones(3))
    with pytest.raises(ValueError, match="dtype"):
        sqrtm(jnp.eye(3, dtype=jnp.int32))


# ----------------------------------------------------------------- condition numbers


def test_condition_numbers(x64):
    p = np.diag([1e-12, 1e-3, 1.0])
    assert condition_number_f64(p) == pytest.approx(1e12)
    assert condition_number_f64(p, eps=1e-2) == pytest.approx(1.01 / (1e-2 + 1e-12))
    assert float(condition_number(jnp.asarray(p))) == pytest.approx(1e12)
    batch = np.stack([np.diag([1.0, 4.0]), np.diag([0.0, 1.0])])
    np.testing.assert_allclose(condition_number_f64(batch), [4.0, np.inf])
    np.testing.assert_allclose(eigvalsh_f64(batch), [[1.0, 4.0], [0.0, 1.0]])
    np.testing.assert_allclose(condition_number(jnp.asarray(batch)), [4.0, np.inf])


def test_float32_cannot_measure_large_kappa():
    """docs/conditioning.md: float32 eigenvalues of a kappa = 1e10 matrix are noise."""
    rng = np.random.default_rng(18)
    p = random_spd(rng, 16, 1e10)
    assert condition_number_f64(p) == pytest.approx(1e10, rel=1e-3)
    kappa32 = float(condition_number(jnp.asarray(p, jnp.float32)))
    assert not (1e9 < kappa32 < 1e11)


def test_eigh_helper_matches_batched_lapack_on_several_cpu_devices():
    # On 2 fake CPU devices the helper decomposes batches one matrix at a time (deadlock
    # workaround); it must agree with the batched call.
    from svdcond_jax.solvers._common import eigh

    assert jax.local_device_count() > 1  # conftest configures 2 fake CPU devices
    a = np.random.default_rng(0).normal(size=(3, 2, 5, 5)).astype(np.float32)
    p = jnp.asarray(a @ np.swapaxes(a, -1, -2))
    lam, u = jax.jit(eigh)(p)
    ref_lam, _ = jnp.linalg.eigh(p)
    np.testing.assert_allclose(lam, ref_lam, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u @ (lam[..., None] * jnp.swapaxes(u, -1, -2)), p,
                               rtol=1e-4, atol=1e-4)
