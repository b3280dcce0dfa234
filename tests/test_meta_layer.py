"""Tests for the SVD meta-layer (Eqs. 1-8; docs/conditioning.md and docs/meta_layer.md)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
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

EPS32 = float(np.finfo(np.float32).eps)
# Iteration counts at which the approximate solvers are accurate to ~1e-10 on the
# moderately conditioned test matrices (kappa <= 20).
CONVERGED = {"newton_schulz": {"num_iters": 30}, "pade": {"lyapunov_iters": 20}}


def random_spd(rng: np.random.Generator, d: int, kappa: float, batch=()) -> np.ndarray:
    """Float64 SPD batch with eigenvalues geometrically spaced in [1/kappa, 1]."""
    q, _ = np.linalg.qr(rng.normal(size=(*batch, d, d)))
    lam = np.geomspace(1.0, 1.0 / kappa, d)
    return (q * lam) @ np.swapaxes(q, -1, -2)


def random_sym(rng: np.random.Generator, d: int) -> np.ndarray:
    v = rng.normal(size=(d, d))
    return (v + v.T) / 2


def np_power(p: np.ndarray, power: float) -> np.ndarray:
    """Float64 NumPy reference P^power via eigh."""
    w, v = np.linalg.eigh(p)
    return (v * w[..., None, :] ** power) @ np.swapaxes(v, -1, -2)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------ forward


def test_covariance_matches_eq2_in_both_layouts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 17))
    n = x.shape[-1]
    j = (np.eye(n) - np.ones((n, n)) / n) / n
    expected = x @ j @ np.swapaxes(x, -1, -2) + 0.1 * np.eye(5)
    first = covariance(jnp.asarray(x, jnp.float32), layout="features_first", eps=0.1)
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
    last = covariance(jnp.asarray(np.swapaxes(x, -1, -2), jnp.float32),
                      layout="features_last", eps=0.1)
    np.testing.assert_allclose(last, expected, rtol=1e-5, atol=1e-6)


def test_covariance_of_one_sample_is_zero_and_layout_is_required():
    x = jnp.asarray([[1.0], [2.0], [3.0]])  # d = 3, N = 1
    np.testing.assert_array_equal(covariance(x, layout="features_first"), np.zeros((3, 3)))
    with pytest.raises(TypeError, match="features_first.*features_last"):
        covariance(x)


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
    tol = {"pade": (1e-2, 5e-2)}.get(method, (1e-5, 1e-4))  # [5/5] Pade: see the docstring
    assert rel_err(q, np_power(p, 0.5)) < tol[0]
    assert rel_err(s, np_power(p, -0.5)) < tol[1]
    np.testing.assert_allclose(sqrtm(jnp.asarray(p, jnp.float32), method=method, **opts), q)


def test_rank_deficient_forward_is_finite_and_clamped():
    """GCP case (docs/conditioning.md): N < d gives a singular covariance."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 5))
    p = covariance(x, layout="features_first")
    q, s = sqrtm_and_inv_sqrtm(p)
    assert np.isfinite(np.asarray(s)).all() and np.isfinite(np.asarray(q)).all()
    # Clamped at eps * lambda_max: the inverse sqrt is at most (eps * lambda_max)^{-1/2}.
    lam_max = eigvalsh_f64(p)[..., -1]
    bound = (EPS32 * lam_max) ** -0.5
    assert (np.linalg.norm(np.asarray(s, np.float64), 2, axis=(-2, -1)) <= 1.01 * bound).all()
    s_raw = inv_sqrtm(p, eig_floor=0.1)
    assert np.linalg.norm(np.asarray(s_raw[0]), 2) <= 1.01 * (0.1 * lam_max[0]) ** -0.5


def test_rounding_level_negative_eigenvalues_are_accepted():
    """A float32 covariance of a rank-deficient feature has eigenvalues ~ -3e-8 ||P||_F:
    rounding, far inside the PSD tolerance sqrt(eps) = 3.5e-4 (docs/meta_layer.md)."""
    x = np.maximum(np.random.default_rng(2).normal(size=(4, 64, 20)), 0)
    p = covariance(jnp.asarray(x, jnp.float32), layout="features_first")
    assert (eigvalsh_f64(p)[..., 0] < 0).any()  # the case this test is about
    for method in METHODS:
        chex.assert_tree_all_finite(sqrtm(p, method=method))
    assert not np.isnan(np.asarray(condition_number(p))).any()  # singular (inf), not NaN


# --------------------------------------------------------------------------- gradients


def _loss(fn, g1, g2):
    """Scalar loss using both outputs so both cotangents are non-trivial."""

    def loss(p):
        q, s = fn(p)
        return jnp.sum(g1 * q) + jnp.sum(g2 * s)

    return loss


@pytest.mark.parametrize(
    "method,opts",
    [("eigh", {}), ("eigh_autodiff", {}), ("newton_schulz", {"num_iters": 6})],
)
def test_check_grads_forward_and_reverse(x64, method, opts):
    """jvp and vjp vs finite differences of the method's own forward, float64."""
    rng = np.random.default_rng(2)
    p = jnp.asarray(random_spd(rng, 5, 10.0))
    g1, g2 = (jnp.asarray(rng.normal(size=(5, 5))) for _ in range(2))
    loss = _loss(lambda a: sqrtm_and_inv_sqrtm(a, method=method, **opts), g1, g2)
    check_grads(loss, (p,), order=1, modes=("fwd", "rev"), atol=1e-7, rtol=1e-7, eps=1e-6)


def test_check_grads_taylor_on_separated_spectrum(x64):
    """The Taylor rule is the exact derivative where the truncated series has converged:
    eigenvalue ratios 0.5, 0.5^101 ~ 4e-31."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    p = jnp.asarray((q * 0.5 ** np.arange(5)) @ q.T)
    g1, g2 = (jnp.asarray(rng.normal(size=(5, 5))) for _ in range(2))
    loss = _loss(lambda a: sqrtm_and_inv_sqrtm(a, backward="taylor"), g1, g2)
    check_grads(loss, (p,), order=1, modes=("fwd", "rev"), atol=1e-7, rtol=1e-7, eps=1e-6)


def test_check_grads_pade_against_own_forward(x64):
    """Pade's Lyapunov derivative is that of the *exact* sqrt evaluated at the Pade
    forward, so it matches finite differences of its own forward only as far as the
    [5/5] Pade forward is exact: kappa = 1.5 keeps z = 1 - lambda/||P||_F <= 0.8, where the
    approximant's error is ~1e-7; tolerance 1e-4 documents that gap honestly."""
    rng = np.random.default_rng(3)
    p = jnp.asarray(random_spd(rng, 4, 1.5))
    g1, g2 = (jnp.asarray(rng.normal(size=(4, 4))) for _ in range(2))
    loss = _loss(lambda a: sqrtm_and_inv_sqrtm(a, method="pade", lyapunov_iters=20), g1, g2)
    check_grads(loss, (p,), order=1, modes=("fwd", "rev"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,opts", [("eigh", {}), ("eigh", {"backward": "taylor"}),
                                         ("pade", CONVERGED["pade"])])
@pytest.mark.parametrize("fn", [sqrtm, inv_sqrtm])
def test_jvp_equals_vjp_transpose_and_jacfwd_equals_jacrev(x64, method, opts, fn):
    """<dQ[V], G> = <V, grad_G>: the custom JVP and the reverse mode jax derives from it
    are adjoint; jacfwd and jacrev agree."""
    rng = np.random.default_rng(4)
    p = jnp.asarray(random_spd(rng, 4, 3.0))
    f = lambda a: fn(a, method=method, **opts)
    v, g = jnp.asarray(random_sym(rng, 4)), jnp.asarray(rng.normal(size=(4, 4)))
    _, dq = jax.jvp(f, (p,), (v,))
    _, vjp = jax.vjp(f, p)
    np.testing.assert_allclose(jnp.sum(dq * g), jnp.sum(v * vjp(g)[0]), rtol=1e-12)
    np.testing.assert_allclose(jax.jacfwd(f)(p), jax.jacrev(f)(p), rtol=1e-10, atol=1e-12)


def test_exact_jvp_equals_central_finite_differences(x64):
    rng = np.random.default_rng(4)
    p = jnp.asarray(random_spd(rng, 6, 1e3))
    for fn in (sqrtm, inv_sqrtm):
        f = jax.jit(fn)
        for seed in range(3):
            v = jnp.asarray(random_sym(np.random.default_rng(seed), 6))
            _, jvp = jax.jit(lambda a, t, fn=fn: jax.jvp(fn, (a,), (t,)))(p, v)
            h = 1e-7
            fd = (f(p + h * v) - f(p - h * v)) / (2 * h)
            np.testing.assert_allclose(jvp, fd, rtol=1e-6, atol=1e-6 * float(jnp.abs(fd).max()))


def test_exact_backward_equals_central_finite_differences(x64):
    rng = np.random.default_rng(4)
    p = jnp.asarray(random_spd(rng, 6, 1e3))
    g1, g2 = (jnp.asarray(rng.normal(size=(6, 6))) for _ in range(2))
    loss = jax.jit(_loss(sqrtm_and_inv_sqrtm, g1, g2))
    grad = jax.jit(jax.grad(loss))(p)
    assert np.allclose(grad, grad.T, atol=1e-12)
    for seed in range(3):
        v = jnp.asarray(random_sym(np.random.default_rng(seed), 6))
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


def _taylor_k_reference(lam: np.ndarray, degree: int) -> np.ndarray:
    """Float64 loops: K of ref [46], signed by comparing the eigenvalues themselves."""
    d = len(lam)
    k = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            if i == j:
                continue
            big, small = (lam[i], lam[j]) if lam[i] >= lam[j] else (lam[j], lam[i])
            series = sum((small / big) ** n for n in range(degree + 1)) / big
            k[i, j] = series if lam[i] >= lam[j] else -series
    return k


def _taylor_grad_reference(p: np.ndarray, g_sqrt: np.ndarray, g_inv: np.ndarray,
                           degree: int = 100) -> np.ndarray:
    """The paper's Eqs. 5-8 in float64 NumPy with the Taylor K, for P^{1/2} and P^{-1/2}."""
    lam, u = np.linalg.eigh(p)
    dl_du, dl_dlam = 0, 0
    for g, power in ((g_sqrt, 0.5), (g_inv, -0.5)):
        dl_du = dl_du + (g + g.T) @ u * lam**power  # Eq. 5
        dl_dlam = dl_dlam + power * lam ** (power - 1) * np.diag(u.T @ g @ u)  # Eq. 6
    inner = _taylor_k_reference(lam, degree).T * (u.T @ dl_du) + np.diag(dl_dlam)  # Eq. 7
    a = u @ inner @ u.T
    return (a + a.T) / 2  # Eq. 8, symmetric part


def test_taylor_backward_with_eigenvalues_one_ulp_apart_matches_float64_reference():
    """Eigenvalues 1 and 1 + 2^-23 (one float32 ulp): their square roots round to the same
    float32, so a K rebuilt from s * s would see a tie and give K_ij = K_ji = +101; K built
    from lambda keeps the signs of the reference (K_ij = -K_ji), and F_ij ~ 0."""
    one_up = float(np.nextafter(np.float32(1), np.float32(2)))
    lam = np.array([0.25, 0.5, 1.0, one_up])
    assert np.float32(np.sqrt(np.float32(one_up))) == np.float32(1.0)  # the trap
    rng = np.random.default_rng(6)
    g1, g2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    p = np.diag(lam)  # exact eigenvalues from a diagonal matrix
    expected = _taylor_grad_reference(p, g1, g2)
    loss = _loss(lambda a: sqrtm_and_inv_sqrtm(a, backward="taylor"),
                 jnp.asarray(g1, jnp.float32), jnp.asarray(g2, jnp.float32))
    got = jax.grad(loss)(jnp.asarray(p, jnp.float32))
    # float32 evaluation of K_ij D_i + K_ji D_j = 101 (D_i - D_j): cancellation of two
    # terms of size 101 * (1 + 1): 1e3 eps absolute; entries of the gradient are O(1).
    np.testing.assert_allclose(got, expected, atol=1e3 * EPS32, rtol=1e-5)


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
        "rank_deficient": covariance(jnp.asarray(x), layout="features_first"),  # N = 3 < 5
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
    """Why the custom derivative exists: autodiff divides by lambda_i - lambda_j = 0."""
    p = _degenerate_inputs()[case].astype(jnp.float32)
    assert np.isnan(np.asarray(_grad(p, "eigh_autodiff"))).all()
    chex.assert_tree_all_finite(_grad(p, "eigh"))


def test_plain_autodiff_through_eigh_is_wrong_at_near_ties(x64):
    """Ties broken by float32 rounding: autodiff is far from the exact gradient (or NaN)
    (float64 reference: the exact closed form, itself checked against finite differences)."""
    p = _degenerate_inputs()["rotated_ties"]
    reference = _grad(p, "eigh")
    p32 = p.astype(jnp.float32)  # explicit float32 computations stay float32 under x64
    assert _grad(p32, "eigh").dtype == jnp.float32
    assert rel_err(_grad(p32, "eigh"), reference) < 1e-5
    assert not rel_err(_grad(p32, "eigh_autodiff"), reference) < 1e-2  # NaN counts as wrong


def test_exact_gradient_at_identity_is_the_isotropic_limit(x64):
    """At P = c I, d sqrt(P)[V] = V / (2 sqrt c) and d P^{-1/2}[V] = -V / (2 c^{3/2})."""
    g = jnp.asarray(np.random.default_rng(10).normal(size=(4, 4)))
    c = 4.0
    grad_q = jax.grad(lambda a: jnp.sum(g * sqrtm(a)))(c * jnp.eye(4))
    grad_s = jax.grad(lambda a: jnp.sum(g * inv_sqrtm(a)))(c * jnp.eye(4))
    sym_g = (g + g.T) / 2
    np.testing.assert_allclose(grad_q, sym_g / (2 * c**0.5), atol=1e-12)
    np.testing.assert_allclose(grad_s, -sym_g / (2 * c**1.5), atol=1e-12)
    _, dq = jax.jvp(sqrtm, (c * jnp.eye(4),), (sym_g,))
    np.testing.assert_allclose(dq, sym_g / (2 * c**0.5), atol=1e-12)


# ---------------------------------------------------------- convergence of iterations


def _decreases_to_floor(errs: list[float], floor: float) -> bool:
    """Each error is below the previous one until the floor is reached, and stays below it
    after: a tolerance-based 'monotone convergence' (values at round-off are not ordered)."""
    for a, b in zip(errs, errs[1:], strict=False):
        if not (b < a or b < floor):
            return False
    return errs[-1] < floor


def test_newton_schulz_converges_monotonically(x64):
    rng = np.random.default_rng(11)
    p = random_spd(rng, 8, 50.0)
    errs = [rel_err(sqrtm(jnp.asarray(p), method="newton_schulz", num_iters=n), np_power(p, 0.5))
            for n in (1, 2, 4, 8, 16, 32)]
    # float64 round-off of the iteration: ~1e3 eps (kappa = 50, 32 steps); floor 1e-10.
    assert _decreases_to_floor(errs, 1e-10), errs
    assert errs[0] > 1e-2  # the test is not vacuous


def test_pade_lyapunov_backward_converges_monotonically(x64):
    rng = np.random.default_rng(12)
    p = jnp.asarray(random_spd(rng, 8, 2.0))
    g = jnp.asarray(rng.normal(size=(8, 8)))
    exact = jax.grad(lambda a: jnp.sum(g * sqrtm(a)))(p)
    errs = [rel_err(jax.grad(lambda a, n=n: jnp.sum(g * sqrtm(a, method="pade",
                                                              lyapunov_iters=n)))(p), exact)
            for n in (1, 2, 4, 8)]
    # floor: the [5/5] Pade forward's error at kappa = 2 (~1e-5), not the iteration.
    assert _decreases_to_floor(errs, 1e-4), errs
    assert errs[0] > 1e-2


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

    def test_vmap_of_jvp_and_grad(self):
        p = jnp.asarray(random_spd(np.random.default_rng(16), 4, 5.0, batch=(3,)), jnp.float32)
        v = jnp.broadcast_to(jnp.eye(4), p.shape)
        for method in ("eigh", "pade"):
            f = lambda a, t, m=method: jax.jvp(lambda b: sqrtm(b, method=m), (a,), (t,))[1]
            chex.assert_trees_all_close(jax.vmap(f)(p, v), f(p, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_low_precision_out(dtype):
    p = jnp.asarray(random_spd(np.random.default_rng(16), 4, 4.0), dtype)
    for method in METHODS:
        q, s = sqrtm_and_inv_sqrtm(p, method=method)
        assert q.dtype == s.dtype == dtype
        assert rel_err(q, np_power(np.asarray(p, np.float64), 0.5)) < 2e-2
        grad = jax.grad(lambda a, m=method: jnp.sum(sqrtm(a, method=m)).astype(jnp.float32))(p)
        assert grad.dtype == dtype
    assert condition_number(p).dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_covariance_is_float32_and_finite(dtype):
    # Activations of magnitude ~300: variances ~9e4 overflowed float16 (max 65504) when the
    # covariance was returned in the input dtype. It is computed and returned in float32,
    # equal to the float64 covariance of the same (rounded) inputs to float32 round-off.
    x = jnp.asarray(300.0 * (1.0 + np.random.default_rng(18).standard_normal((2, 5, 64))),
                    dtype)
    x64 = np.asarray(x, np.float64)
    xc = x64 - x64.mean(-1, keepdims=True)
    ref = xc @ np.swapaxes(xc, -1, -2) / x64.shape[-1] + 0.5 * np.eye(5)
    assert ref.max() > float(jnp.finfo(jnp.float16).max)  # the float16 overflow case
    for layout, xin in (("features_first", x), ("features_last", jnp.swapaxes(x, -1, -2))):
        p = covariance(xin, layout=layout, eps=0.5)
        assert p.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(p)))
        np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert sqrtm(p).dtype == jnp.float32  # the meta-layer takes it as it is


def test_float64_stays_float64(x64):
    p = jnp.asarray(random_spd(np.random.default_rng(17), 4, 4.0))
    for method in METHODS:
        assert sqrtm(p, method=method).dtype == jnp.float64


# ------------------------------------------------------------------ zero and non-PSD


@pytest.mark.parametrize("method", METHODS)
def test_zero_matrix(method):
    """sqrtm(0) = 0 exactly (0 is PSD); its derivative is unbounded: NaN; inv_sqrtm(0) has
    no finite value: NaN (docs/meta_layer.md)."""
    zero = jnp.zeros((2, 3, 3))
    np.testing.assert_array_equal(sqrtm(zero, method=method), 0.0)
    assert np.isnan(np.asarray(inv_sqrtm(zero, method=method))).all()
    grad = jax.grad(lambda a: jnp.sum(sqrtm(a, method=method)))(zero)
    assert np.isnan(np.asarray(grad)).all()


@pytest.mark.parametrize("method", METHODS)
def test_non_psd_gives_nan_per_matrix(method):
    """-I (measured before: eigh gave 3.5e-4 I) and diag(4, -1) (Newton-Schulz gave an entry
    of -1e6) are not PSD: NaN for them, value and gradient, the other matrices untouched."""
    good = jnp.diag(jnp.array([4.0, 1.0]))
    batch = jnp.stack([good, -jnp.eye(2), jnp.diag(jnp.array([4.0, -1.0]))])
    q, s = sqrtm_and_inv_sqrtm(batch, method=method)
    for out in (q, s):
        assert np.isnan(np.asarray(out[1:])).all()
        chex.assert_tree_all_finite(out[0])
    np.testing.assert_allclose(q[0], jnp.diag(jnp.array([2.0, 1.0])), rtol=2e-2)
    grad = jax.grad(lambda a: jnp.sum(jnp.nan_to_num(sqrtm(a, method=method)[0])))(batch)
    chex.assert_tree_all_finite(grad[0])
    grad_bad = jax.grad(lambda a: jnp.sum(sqrtm(a, method=method)[1]))(batch)
    assert np.isnan(np.asarray(grad_bad[1])).all()


# --------------------------------------------------------------------------- sharding


def _mesh() -> Mesh:
    assert jax.device_count() == 2  # conftest configures 2 fake CPU devices
    return Mesh(np.array(jax.devices()), ("batch",))


@pytest.mark.parametrize("method", METHODS)
def test_batch_sharded_over_a_mesh_stays_sharded(method):
    """The eigh/Cholesky/LU calls keep a batch-sharded input sharded (no all-gather), and
    the values match the unsharded computation."""
    p = jnp.asarray(random_spd(np.random.default_rng(18), 6, 10.0, batch=(4,)), jnp.float32)
    sharding = NamedSharding(_mesh(), P("batch"))
    ps = jax.device_put(p, sharding)
    f = jax.jit(lambda a: sqrtm_and_inv_sqrtm(a, method=method))
    for out, ref in zip(f(ps), f(p), strict=True):
        assert out.sharding.is_equivalent_to(sharding, out.ndim), out.sharding
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(sqrtm(a, method=method))))(ps)
    assert grad.sharding.is_equivalent_to(sharding, grad.ndim), grad.sharding


def _lapack_batch_sizes(fn, x) -> set[int]:
    """Leading (batch) dim of the operand of every LAPACK custom call in fn's compiled HLO."""
    hlo = jax.jit(fn).lower(x).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack_' in line]
    assert calls, "expected LAPACK custom calls on the CPU backend"
    return {int(line.split("custom-call(")[0].split("f32[")[1].split(",")[0]) for line in calls}


def test_lapack_calls_see_one_matrix_per_device():
    """The deadlock protection (solvers/_common.map_matrices): on a multi-device CPU backend
    a batch sharded over the devices reaches every LAPACK call one matrix per device, as
    the previous one-at-a-time loop did; a replicated batch n = 2 matrices per call
    (documented there)."""
    p = jnp.asarray(random_spd(np.random.default_rng(19), 40, 10.0, batch=(8,)), jnp.float32)
    sharded = jax.device_put(p, NamedSharding(_mesh(), P("batch")))
    replicated = jax.device_put(p, NamedSharding(_mesh(), P()))
    for method in ("eigh", "newton_schulz", "pade"):
        fn = lambda a, m=method: sqrtm(a, method=m)
        assert _lapack_batch_sizes(fn, sharded) == {1}, method
        assert _lapack_batch_sizes(fn, replicated) == {2}, method


def test_sharding_edge_cases_give_the_same_values():
    """A batch that does not divide over the devices, a replicated batch, and shard_map."""
    p = jnp.asarray(random_spd(np.random.default_rng(20), 5, 10.0, batch=(6,)), jnp.float32)
    ref = np.stack([np_power(np.asarray(a, np.float64), 0.5) for a in p])
    mesh = _mesh()
    np.testing.assert_allclose(jax.jit(sqrtm)(p[:3]), ref[:3], atol=1e-5)
    replicated = jax.device_put(p, NamedSharding(mesh, P()))
    np.testing.assert_allclose(jax.jit(sqrtm)(replicated), ref, atol=1e-5)
    mapped = jax.jit(jax.shard_map(sqrtm, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
    np.testing.assert_allclose(mapped(p), ref, atol=1e-5)


# ----------------------------------------------------------------- condition numbers


def test_condition_numbers(x64):
    p = np.diag([1e-12, 1e-3, 1.0])
    assert condition_number_f64(p) == pytest.approx(1e12)
    assert condition_number_f64(p, eps=1e-2) == pytest.approx(1.01 / (1e-2 + 1e-12))
    assert float(condition_number(jnp.asarray(p))) == pytest.approx(1e12)
    batch = np.stack([np.diag([1.0, 4.0]), np.diag([0.0, 1.0]), np.diag([-1.0, 1.0])])
    np.testing.assert_allclose(condition_number_f64(batch), [4.0, np.inf, np.nan])
    np.testing.assert_allclose(eigvalsh_f64(batch), [[1.0, 4.0], [0.0, 1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(condition_number(jnp.asarray(batch)), [4.0, np.inf, np.nan])


def test_float32_cannot_measure_large_kappa():
    """docs/conditioning.md: float32 eigenvalues of a kappa = 1e10 matrix are noise. The
    float32 lambda_min carries errors ~eps * lambda_max >> 1e-10, so the readings of five
    matrices cannot all land within 10x of the truth (float64 reads them to 0.1%)."""
    readings = []
    for seed in range(5):
        p = random_spd(np.random.default_rng(18 + seed), 16, 1e10)
        assert condition_number_f64(p) == pytest.approx(1e10, rel=1e-3)
        readings.append(float(condition_number(jnp.asarray(p, jnp.float32))))
    assert not all(1e9 < k < 1e11 for k in readings), readings


def test_eigh_helper_matches_batched_lapack_on_several_cpu_devices():
    # On 2 fake CPU devices the helper decomposes batches one matrix per device and call
    # (deadlock workaround); it must agree with the batched call.
    from svdcond_jax.solvers._common import eigh

    assert jax.local_device_count() > 1  # conftest configures 2 fake CPU devices
    a = np.random.default_rng(0).normal(size=(3, 2, 5, 5)).astype(np.float32)
    p = jnp.asarray(a @ np.swapaxes(a, -1, -2))
    lam, u = jax.jit(eigh)(p)
    ref_lam, _ = jnp.linalg.eigh(p)
    np.testing.assert_allclose(lam, ref_lam, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u @ (lam[..., None] * jnp.swapaxes(u, -1, -2)), p,
                               rtol=1e-4, atol=1e-4)
