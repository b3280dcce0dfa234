"""Tests for svdcond_jax.orthogonal: polar factor (Eqs. 14-17), Eq. 12 loss, Eq. 13 expm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdcond_jax import orthogonal
from svdcond_jax.orthogonal import (
    as_matrix,
    default_rtol,
    orthogonality_loss,
    polar_factor,
    skew_symmetric_expm,
)

SHAPES = [(6, 6), (9, 4), (4, 9), (27, 16), (16, 27)]
METHODS = ("svd", "newton_schulz")
EPS32 = float(np.finfo(np.float32).eps)


def _polar_f64(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return u @ vt


def _with_singular_values(rng: np.random.Generator, rows: int, cols: int, s) -> tuple:
    """(float64 matrix U diag(s) V^T, U, V) with orthonormal U (rows, k), V (cols, k)."""
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.normal(size=(rows, k)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, k)))
    return (u * s) @ v.T, u, v


def _with_kappa(rng: np.random.Generator, rows: int, cols: int, kappa: float) -> np.ndarray:
    k = min(rows, cols)
    return _with_singular_values(rng, rows, cols, np.logspace(0, -np.log10(kappa), k))[0]


def _singular_values(r) -> np.ndarray:
    return np.linalg.svd(np.asarray(r, np.float64), compute_uv=False)


def _stem_gradient(seed: int) -> jax.Array:
    """A float32 27 x 16 gradient of rank 9 (product with inner dimension 9): 9 singular
    values O(1), 7 at float32 rounding (~3e-8 sigma_max), as a 3x3 RGB stem's can be."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(27, 9)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(9, 16)), jnp.float32)
    return a @ b


# ------------------------------------------------------------------------- full rank


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_svd_polar_matches_numpy_and_has_unit_singular_values(shape, seed):
    """Full-rank input: unchanged, U V^T (float64 NumPy reference)."""
    m = np.random.default_rng(seed).normal(size=shape)
    r = polar_factor(jnp.asarray(m, jnp.float32))
    chex.assert_shape(r, shape)
    # Round-off of float32 products of k <= 27 terms: ~100 eps (measured <= 9 eps).
    np.testing.assert_allclose(_singular_values(r), 1.0, atol=100 * EPS32)
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
    for method in METHODS:
        r = polar_factor(jnp.asarray(m), method=method)
        for i in range(3):
            np.testing.assert_allclose(r[i], _polar_f64(m[i]), atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_zero_matrix_gives_zero(method):
    r = polar_factor(jnp.zeros((4, 6)), method=method)
    np.testing.assert_array_equal(r, 0.0)


@pytest.mark.parametrize("shape", [(16, 16), (9, 32), (32, 9)])
@pytest.mark.parametrize("kappa", [10.0, 100.0])
def test_newton_schulz_accuracy(shape, kappa):
    """Measured accuracy claim of polar_factor's docstring: 20 iters suffice to kappa 100."""
    m = _with_kappa(np.random.default_rng(5), *shape, kappa)
    r = polar_factor(jnp.asarray(m, jnp.float32), method="newton_schulz", num_iters=20)
    assert np.abs(_singular_values(r) - 1).max() < 1e-5
    np.testing.assert_allclose(r, _polar_f64(m), atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (27, 64)])
@pytest.mark.parametrize("kappa", [1e3, 1e5])
def test_newton_schulz_default_reaches_round_off_up_to_the_cutoff(shape, kappa):
    """Default iterations: every singular value above the cutoff converges to 1 at float32
    round-off (measured 2e-7, docs/nog_olr.md); the result is the svd method's."""
    m = jnp.asarray(_with_kappa(np.random.default_rng(6), *shape, kappa), jnp.float32)
    r = polar_factor(m, method="newton_schulz")
    assert np.abs(_singular_values(r) - 1).max() < 1e-5
    # Both are within ~eps sqrt(k) kappa of the exact factor (its sensitivity to the
    # rounding of m, ||dR||_F <~ 2 ||dM||_F / sigma_min).
    diff = np.linalg.norm(np.asarray(r, np.float64) - np.asarray(polar_factor(m), np.float64))
    assert diff < EPS32 * min(shape) ** 0.5 * kappa


def test_newton_schulz_converges_monotonically_with_iterations():
    """The error falls with the number of steps until float32 round-off, then stays there:
    errors at round-off are compared against the floor, never against each other (they
    differ between CPUs: 6.950e-08 vs 7.070e-08 on an AMD EPYC)."""
    m = _with_kappa(np.random.default_rng(6), 16, 16, 1e3)
    floor = 1e-5  # ~100 eps: round-off of 16 x 16 float32 products, with margin
    errs = []
    for iters in (5, 15, 25, 40):
        r = polar_factor(jnp.asarray(m, jnp.float32), method="newton_schulz", num_iters=iters)
        errs.append(np.abs(_singular_values(r) - 1).max())
    for a, b in zip(errs, errs[1:], strict=False):
        assert b < a or b < floor, errs
    assert errs[0] > 0.5 and errs[-1] < floor, errs


# -------------------------------------------------------------------- rank-deficient


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_deficient_input_gives_the_rank_r_partial_isometry(method, seed):
    """9 singular values in [1, 3] and 7 exactly 0 (float64 construction, float32 input):
    R = U_9 V_9^T, singular values nine 1s and seven 0s, R R^T R = R."""
    s = np.concatenate([np.random.default_rng(seed).uniform(1, 3, 9), np.zeros(7)])
    m, u, v = _with_singular_values(np.random.default_rng(seed), 27, 16, s)
    r = polar_factor(jnp.asarray(m, jnp.float32), method=method)
    expected = u[:, :9] @ v[:, :9].T
    # float32 rounding of m (eps * ||m||) moves the rank-9 subspace by ~eps sigma_1/sigma_9.
    tol = 100 * EPS32 * 3.0
    np.testing.assert_allclose(r, expected, atol=tol)
    np.testing.assert_allclose(_singular_values(r), [1.0] * 9 + [0.0] * 7, atol=tol)
    r64 = np.asarray(r, np.float64)
    np.testing.assert_allclose(r64 @ r64.T @ r64, r64, atol=tol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svd_and_newton_schulz_agree_on_a_rank_deficient_gradient(seed):
    """The stem-gradient case of the issue: before, the two methods differed by 0.63 in
    relative Frobenius norm (NS amplified the rounding-level singular values part way)."""
    g = _stem_gradient(seed)
    r_svd = np.asarray(polar_factor(g), np.float64)
    r_ns = np.asarray(polar_factor(g, method="newton_schulz"), np.float64)
    sv = _singular_values(g)
    assert sv[9] < default_rtol(27, 16, jnp.float32) * sv[0] < sv[8]  # rank 9 numerically
    # Two float32 evaluations of the same partial isometry: a few eps * sigma_1 / sigma_9.
    tol = 100 * EPS32 * sv[0] / sv[8]
    assert np.linalg.norm(r_ns - r_svd) / np.linalg.norm(r_svd) < tol
    np.testing.assert_allclose(_singular_values(r_ns), [1.0] * 9 + [0.0] * 7, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polar_factor_is_continuous_on_a_rank_deficient_gradient(method, seed):
    """A relative perturbation of 3e-7 (below the cutoff) changes R by O(3e-7 sigma_1 /
    sigma_9); before, by 0.9 (svd) and 0.5 (Newton-Schulz)."""
    g = _stem_gradient(seed)
    d = np.random.default_rng(100 + seed).normal(size=g.shape)
    dg = jnp.asarray(d * (3e-7 * np.linalg.norm(np.asarray(g)) / np.linalg.norm(d)), g.dtype)
    r0 = np.asarray(polar_factor(g, method=method), np.float64)
    r1 = np.asarray(polar_factor(g + dg, method=method), np.float64)
    sv = _singular_values(g)
    change = np.linalg.norm(r1 - r0) / np.linalg.norm(r0)
    assert change < 100 * 3e-7 * sv[0] / sv[8], change


@pytest.mark.parametrize("method", METHODS)
def test_cutoff_is_relative_to_sigma_max(method):
    """A singular value at 2x the cutoff is kept (1), at 0.5x dropped (0); rtol=0 keeps
    every nonzero one (svd)."""
    rtol = 1e-3
    s = np.array([1.0, 0.5, 2 * rtol, 0.5 * rtol]) * 7.0  # the scale does not matter
    m, _, _ = _with_singular_values(np.random.default_rng(7), 6, 4, s)
    r = polar_factor(jnp.asarray(m, jnp.float32), method=method, rtol=rtol)
    np.testing.assert_allclose(_singular_values(r), [1, 1, 1, 0], atol=1e-5)
    if method == "svd":
        r0 = polar_factor(jnp.asarray(m, jnp.float32), rtol=0.0)
        np.testing.assert_allclose(_singular_values(r0), [1, 1, 1, 1], atol=1e-5)


def test_polar_factor_jit_and_vmap():
    m = jnp.asarray(np.random.default_rng(7).normal(size=(3, 6, 4)), jnp.float32)
    for method in METHODS:
        f = jax.jit(lambda x, method=method: polar_factor(x, method=method))
        np.testing.assert_allclose(f(m[0]), _polar_f64(np.asarray(m[0])), atol=1e-4)
        chex.assert_trees_all_close(jax.vmap(f)(m), f(m), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_low_precision_out(dtype):
    m = jnp.asarray(np.random.default_rng(8).normal(size=(6, 4)), dtype)
    for method in METHODS:
        r = polar_factor(m, method=method)
        assert r.dtype == dtype
        np.testing.assert_allclose(np.asarray(r, np.float64),
                                   _polar_f64(np.asarray(m, np.float64)), atol=2e-2)
    a = jnp.asarray(np.random.default_rng(9).normal(size=(4, 4)), dtype)
    q = skew_symmetric_expm(a)
    assert q.dtype == dtype
    np.testing.assert_allclose(np.asarray(q @ q.T, np.float64), np.eye(4), atol=3e-2)
    assert orthogonality_loss(m).dtype == dtype


# ----------------------------------------------------------------------- Eqs. 12, 13


def test_as_matrix_roundtrip():
    x = jnp.arange(3 * 3 * 2 * 5.0).reshape(3, 3, 2, 5)
    m, back = as_matrix(x)
    chex.assert_shape(m, (18, 5))
    np.testing.assert_array_equal(back(m), x)


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


# ------------------------------------------------------------------ polar_express


def _schatten8(m: np.ndarray) -> float:
    return float(np.sum(_singular_values(m) ** 8) ** (1 / 8))


def test_polar_express_coefficients_meet_their_claims(x64):
    """The committed schedule, composed in float64 on a million points: within
    POLAR_EXPRESS_ERROR (< 1e-2) of 1 on [3e-3, 1.01], increasing below 3e-3, <= 1e-2 up
    to POLAR_EXPRESS_RTOL, never above 1 + error."""
    from benchmarks.polar_coefficients import CUSHION, LOW, verify

    assert (LOW, 1 + CUSHION) == (orthogonal.POLAR_EXPRESS_LOW, 1.01)
    got = verify(orthogonal.POLAR_EXPRESS_COEFFS)
    assert got["error"] <= orthogonal.POLAR_EXPRESS_ERROR < 1e-2
    assert got["cut"] >= orthogonal.POLAR_EXPRESS_RTOL
    assert got["increasing"] and got["max"] <= 1 + orthogonal.POLAR_EXPRESS_ERROR
    assert len(orthogonal.POLAR_EXPRESS_COEFFS) == 5  # optax.contrib.muon's step count


def test_polar_express_coefficients_are_the_derived_ones():
    pytest.importorskip("scipy")
    from benchmarks.polar_coefficients import derive

    np.testing.assert_allclose(derive(), orthogonal.POLAR_EXPRESS_COEFFS, rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (27, 64), (300, 40)])
def test_polar_express_reaches_its_accuracy_over_the_claimed_interval(shape):
    """Singular values log-spaced over [3.2e-3 s, s] (s the Schatten-8 norm, a third of
    them at the top so that s is loose): all end within 7.6e-3 (+ float32 round-off) of 1,
    and the factor is within that of the exact one in spectral norm."""
    k = min(shape)
    s8 = (k // 3 + 1) ** (1 / 8)  # about the Schatten-8 norm of the spectrum below
    s = np.geomspace(1.0, 3.2e-3 * s8, k)
    s[: k // 3] = 1.0
    m, _, _ = _with_singular_values(np.random.default_rng(11), *shape, s)
    assert _singular_values(m).min() / _schatten8(m) >= orthogonal.POLAR_EXPRESS_LOW
    r = polar_factor(jnp.asarray(m, jnp.float32), method="polar_express")
    err = np.abs(_singular_values(r) - 1).max()
    assert err <= orthogonal.POLAR_EXPRESS_ERROR + 1e-4, err
    diff = np.asarray(r, np.float64) - _polar_f64(m)
    assert np.linalg.norm(diff, 2) <= orthogonal.POLAR_EXPRESS_ERROR + 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polar_express_rank_deficient_input_gives_the_partial_isometry(seed):
    """9 singular values in [1, 3], 7 exactly 0 (float32 rounding ~1e-7): the 9 end within
    1e-2 of 1, the 7 at the rounding level times the iteration's slope (~570 x) -- far
    below the 1e-2 of the cut -- and R is within 1e-2 of U_9 V_9^T in spectral norm."""
    s = np.concatenate([np.random.default_rng(seed).uniform(1, 3, 9), np.zeros(7)])
    m, u, v = _with_singular_values(np.random.default_rng(seed), 27, 16, s)
    r = np.asarray(polar_factor(jnp.asarray(m, jnp.float32), method="polar_express"),
                   np.float64)
    sv = _singular_values(r)
    assert np.abs(sv[:9] - 1).max() <= orthogonal.POLAR_EXPRESS_ERROR + 1e-4
    assert sv[9:].max() < 1e-3
    assert np.linalg.norm(r - u[:, :9] @ v[:, :9].T, 2) < 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_polar_express_is_continuous_on_a_rank_deficient_gradient(seed):
    g = _stem_gradient(seed)
    d = np.random.default_rng(100 + seed).normal(size=g.shape)
    dg = jnp.asarray(d * (3e-7 * np.linalg.norm(np.asarray(g)) / np.linalg.norm(d)), g.dtype)
    r0, r1 = (np.asarray(polar_factor(x, method="polar_express"), np.float64)
              for x in (g, g + dg))
    sv = _singular_values(g)
    assert np.linalg.norm(r1 - r0) / np.linalg.norm(r0) < 100 * 3e-7 * sv[0] / sv[8]
    # and it agrees with the exact rank-aware factor to its accuracy
    assert np.linalg.norm(r0 - np.asarray(polar_factor(g), np.float64), 2) < 1e-2


def test_polar_express_rtol_places_the_cut():
    """rtol = 1e-4: a singular value at 0.5 rtol s ends <= 1e-2, those >= 170 rtol s end
    within 1e-2 of 1 (alpha = 1.76e-5 / rtol moves the design interval)."""
    rtol = 1e-4
    s = np.array([1.0, 0.5, 0.05, 0.02, 0.5 * rtol, 0.1 * rtol])
    m, _, _ = _with_singular_values(np.random.default_rng(7), 8, 6, s)
    sn = _singular_values(m) / _schatten8(m)
    assert sn[3] >= rtol / orthogonal.POLAR_EXPRESS_RTOL * orthogonal.POLAR_EXPRESS_LOW
    r = polar_factor(jnp.asarray(m, jnp.float32), method="polar_express", rtol=rtol)
    sv = _singular_values(r)
    assert np.abs(sv[:4] - 1).max() < 1e-2 and sv[4:].max() <= 1e-2, sv


def test_polar_express_costs_no_more_than_optax_muon():
    """Same number of matrix products as optax.contrib.muon's Newton-Schulz (5 quintic
    steps): XLA's flop count of the compiled functions (speed: benchmarks/polar.py)."""
    from optax.contrib import _muon

    coeffs = jnp.asarray(_muon._DEFAULT_NS_COEFFS)

    def flops(f, shape):
        compiled = jax.jit(f).lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    for shape in [(576, 64), (64, 256), (147, 64)]:
        ours = flops(lambda x: polar_factor(x, method="polar_express"), shape)
        muon = flops(lambda x: _muon.orthogonalize_via_newton_schulz(x, coeffs, 5), shape)
        assert ours <= muon, (shape, ours, muon)


def test_muon_method_is_optax_muons_newton_schulz():
    from optax.contrib import _muon

    coeffs = jnp.asarray(_muon._DEFAULT_NS_COEFFS)
    for shape in [(27, 16), (16, 40)]:
        m = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
        ref = _muon.orthogonalize_via_newton_schulz(m, coeffs, 5)
        np.testing.assert_allclose(polar_factor(m, method="muon"), ref, atol=1e-5)
        sv = _singular_values(ref)  # not a polar factor: spread around 1
        assert sv.max() > 1.05 and sv.min() < 0.95


def test_polar_express_bfloat16_products_accumulate_in_float32():
    m = jnp.asarray(np.random.default_rng(5).normal(size=(96, 32)), jnp.float32)
    f = lambda x: polar_factor(x, method="polar_express", matmul_dtype=jnp.bfloat16)
    text = str(jax.make_jaxpr(f)(m))
    assert "bf16[" in text and "preferred_element_type=float32" in text
    r = f(m)
    assert r.dtype == jnp.float32
    # bfloat16 operands (8 bits of mantissa) bound the accuracy: measured 8e-3 here
    assert np.abs(_singular_values(r) - 1).max() < 3e-2


def test_polar_express_batched_and_zero():
    m = jnp.asarray(np.random.default_rng(6).normal(size=(4, 20, 12)), jnp.float32)
    m = m.at[2].set(0.0)
    f = jax.jit(lambda x: polar_factor(x, method="polar_express"))
    r = f(m)
    single = jnp.stack([f(x) for x in m])
    np.testing.assert_allclose(r, single, atol=1e-5)
    np.testing.assert_array_equal(r[2], 0.0)
    assert np.abs(_singular_values(r[0]) - 1).max() < 1e-2
