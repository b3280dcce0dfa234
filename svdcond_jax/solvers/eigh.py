"""Eigendecomposition solver (Eqs. 3-4) with the exact or the Taylor derivative (Eqs. 5-8).

Forward: P = U diag(lambda) U^T via ``jnp.linalg.eigh`` (P is symmetric PSD, so the SVD of
the paper is an eigendecomposition, and eigh is ~2x cheaper than svd). Eigenvalues are
clamped at ``eig_floor * lambda_max`` before sqrt / inverse sqrt (docs/conditioning.md:
rank-deficient covariances are the normal case in GCP and decorrelated BN). An input with
lambda_min < -sqrt(eps) ||P||_F is not PSD and gives NaN.

Derivative (``jax.custom_jvp``: ``jax.jvp``/``jacfwd`` and, transposed by jax,
``jax.grad``/``vjp``), docs/meta_layer.md. Both rules are Daleckii-Krein forms

    d f(P)[dP] = U [(U^T sym(dP) U) o F] U^T

with a symmetric F, linear in dP and self-adjoint, so the gradient is the same expression
with the cotangent G in place of dP:

* ``"exact"``: F_ij = 1/(s_i + s_j) (sqrt) and F_ij = -1/(s_i s_j (s_i + s_j)) (inverse
  sqrt), s = sqrt(lambda). No eigenvalue differences: exact and finite for repeated
  eigenvalues (identity input included).
* ``"taylor"``: the paper's Eqs. 5-8 with K_ij = 1/(lambda_i - lambda_j) replaced by its
  degree-``taylor_degree`` Taylor series (ref [46]); bounded at ties, biased near them.

Clamped eigenvalues: both rules are evaluated at the clamped spectrum, i.e. they return the
derivative of P' = U diag(max(lambda, floor)) U^T's function, treating the floor (which
depends on lambda_max) as a constant. Where no eigenvalue is clamped this is exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from svdcond_jax.solvers._common import (
    Array,
    eigh,
    frobenius,
    mm,
    mT,
    nan_where,
    psd_tolerance,
    reconstruct,
    sym,
)

BACKWARDS = ("exact", "taylor")


def default_eig_floor(dtype: jnp.dtype) -> float:
    """Default relative eigenvalue floor: the machine epsilon of the compute dtype.

    The eigenvalues of a matrix stored in a floating-point format carry absolute errors of
    about eps * lambda_max (docs/conditioning.md), so eigenvalues below that level are
    indistinguishable from zero; clamping there loses no information and caps the condition
    number the meta-layer sees at 1/eps (~8e6 in float32, ~4.5e15 in float64).
    """
    return float(jnp.finfo(dtype).eps)


def clamp_eigenvalues(lam: Array, eig_floor: float) -> Array:
    """Clamp ascending eigenvalues (..., d) at ``eig_floor * max(lambda_max, 0)``.

    Eigenvalues slightly below zero (rounding of a PSD matrix) become the floor. The zero
    matrix has floor 0: its square root is exactly 0 (and its inverse square root 1/0).
    """
    floor = eig_floor * jnp.maximum(lam[..., -1:], 0)
    return jnp.maximum(lam, jax.lax.stop_gradient(floor))


def taylor_geometric_sum(p: Array, degree: int) -> Array:
    """sum_{k=0}^{degree} p^k for p in [0, 1], evaluated as (1 - p^{n}) / (1 - p), n = degree+1.

    Written with expm1/log1p so it is accurate near p = 1 (value -> n) and costs one pass
    instead of ``degree`` passes; equals the truncated series of ref [46] up to rounding.
    """
    n = degree + 1
    one_minus_p = 1 - p
    at_one = one_minus_p <= 0
    safe = jnp.where(at_one, jnp.full_like(p, 0.5), one_minus_p)
    # log(p) = log1p(-(1 - p)); p = 0 gives -inf and expm1(-inf) = -1, i.e. the sum is 1.
    numer = -jnp.expm1(n * jnp.log1p(-safe))
    return jnp.where(at_one, jnp.full_like(p, float(n)), numer / safe)


def _taylor_k(lam: Array, degree: int) -> Array:
    """Taylor approximation of K_ij = 1/(lambda_i - lambda_j), K_ii = 0 (Eq. 7, ref [46]).

    As in the reference code of [46]: K_ij = (1/lambda_i) sum_k (lambda_j/lambda_i)^k when
    lambda_i >= lambda_j, else -(1/lambda_j) sum_k (lambda_i/lambda_j)^k. At a tie both
    K_ij and K_ji are (degree+1)/lambda (bounded, but not the exact limit).
    """
    li, lj = lam[..., :, None], lam[..., None, :]
    i_larger = li >= lj
    big = jnp.where(i_larger, li, lj)
    ratio = jnp.where(i_larger, lj, li) / big
    k = jnp.where(i_larger, 1.0, -1.0) / big * taylor_geometric_sum(ratio, degree)
    return k * (1 - jnp.eye(lam.shape[-1], dtype=lam.dtype))


def divided_differences(
    lam: Array, s: Array, power: float, backward: str, degree: int
) -> Array:
    """The symmetric matrix F of the derivative U [(U^T sym(dP) U) o F] U^T of P^power.

    ``power`` is 0.5 (square root) or -0.5 (inverse square root); lam are the (clamped)
    eigenvalues and s = sqrt(lam). ``"exact"``: the divided differences of lambda^power in
    closed form, F_ij = 1/(s_i + s_j) and -1/(s_i s_j (s_i + s_j)). ``"taylor"``: the paper's
    Eqs. 5-8 rewritten (docs/meta_layer.md), F_ij = K_ij D_i + K_ji D_j (i != j) and
    F_ii = power lambda_i^(power - 1), D = lambda^power, K the Taylor K of Eq. 7 built from
    lam itself (never from s * s: eigenvalues one ulp apart would round to a tie).
    """
    si, sj = s[..., :, None], s[..., None, :]
    if backward == "exact":
        return 1 / (si + sj) if power > 0 else -1 / (si * sj * (si + sj))
    d = s if power > 0 else 1 / s
    k = _taylor_k(lam, degree)
    off = k * d[..., :, None] + mT(k) * d[..., None, :]
    diag = power * d / lam  # power * lambda^(power - 1)
    return off + diag[..., None] * jnp.eye(lam.shape[-1], dtype=lam.dtype)


def _spectrum(p: Array, eig_floor: float) -> tuple[Array, Array, Array, Array]:
    """Eigenvectors u, clamped eigenvalues lam, s = sqrt(lam) and the not-PSD mask (...)."""
    lam_raw, u = eigh(p)
    lam = clamp_eigenvalues(lam_raw, eig_floor)
    not_psd = lam_raw[..., 0] < -psd_tolerance(p.dtype) * frobenius(p)
    return u, lam, jnp.sqrt(lam), not_psd


def _values(u: Array, s: Array, not_psd: Array, want_sqrt: bool, want_inv: bool):
    q = nan_where(not_psd, reconstruct(u, s)) if want_sqrt else None
    inv = nan_where(not_psd, reconstruct(u, 1 / s)) if want_inv else None
    return q, inv


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _eigh_custom(
    p: Array, want_sqrt: bool, want_inv: bool, eig_floor: float, backward: str, degree: int
):
    u, _, s, not_psd = _spectrum(p, eig_floor)
    return _values(u, s, not_psd, want_sqrt, want_inv)


@_eigh_custom.defjvp
def _eigh_custom_jvp(want_sqrt, want_inv, eig_floor, backward, degree, primals, tangents):
    (p,), (dp,) = primals, tangents
    u, lam, s, not_psd = _spectrum(p, eig_floor)
    rotated = mm(mT(u), mm(sym(dp), u))

    def tangent(power: float) -> Array:
        f = divided_differences(lam, s, power, backward, degree)
        return nan_where(not_psd, mm(u, mm(rotated * f, mT(u))))

    dq = tangent(0.5) if want_sqrt else None
    dinv = tangent(-0.5) if want_inv else None
    return _values(u, s, not_psd, want_sqrt, want_inv), (dq, dinv)


def matrix_functions(
    p: Array,
    *,
    want_sqrt: bool,
    want_inv: bool,
    backward: str = "exact",
    taylor_degree: int = 100,
    eig_floor: float | None = None,
) -> tuple[Array | None, Array | None]:
    """P^{1/2} and/or P^{-1/2} from one eigendecomposition (Eqs. 3-4), custom derivative.

    Args:
      p: symmetric batch (..., d, d), float32 or float64.
      want_sqrt: return P^{1/2}.
      want_inv: return P^{-1/2}.
      backward: "exact" (closed-form Daleckii-Krein) or "taylor" (Eqs. 5-7, ref [46]).
      taylor_degree: degree of the Taylor series of K (used by backward="taylor").
      eig_floor: relative eigenvalue floor; None -> machine eps of p's dtype.

    Returns:
      (sqrt or None, inverse sqrt or None); NaN for the matrices that are not PSD.
    """
    floor = default_eig_floor(p.dtype) if eig_floor is None else float(eig_floor)
    return _eigh_custom(p, want_sqrt, want_inv, floor, backward, int(taylor_degree))


def autodiff_matrix_functions(
    p: Array, *, want_sqrt: bool, want_inv: bool, eig_floor: float | None = None
) -> tuple[Array | None, Array | None]:
    """Same forward as :func:`matrix_functions`, plain autodiff through ``jnp.linalg.eigh``.

    The failing baseline: its derivative divides by eigenvalue differences, so it is NaN for
    an identity or any repeated eigenvalue (measured with jax 0.10.2).
    """
    floor = default_eig_floor(p.dtype) if eig_floor is None else float(eig_floor)
    u, _, s, not_psd = _spectrum(p, floor)
    return _values(u, s, not_psd, want_sqrt, want_inv)
