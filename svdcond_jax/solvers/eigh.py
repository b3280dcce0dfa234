"""Eigendecomposition solver (Eqs. 3-4) with exact or Taylor backward (Eqs. 5-8).

Forward: P = U diag(lambda) U^T via ``jnp.linalg.eigh`` (P is symmetric PSD, so the SVD of
the paper is an eigendecomposition, and eigh is ~2x cheaper than svd). Eigenvalues are
clamped at ``eig_floor * lambda_max`` before sqrt / inverse sqrt (docs/conditioning.md:
rank-deficient covariances are the normal case in GCP and decorrelated BN).

Backward (``jax.custom_vjp``), docs/meta_layer.md:

* ``"exact"``: the Daleckii-Krein rule dl/dP = U [(U^T sym(G) U) o F] U^T with the closed
  forms F_ij = 1/(s_i + s_j) (sqrt) and F_ij = -1/(s_i s_j (s_i + s_j)) (inverse sqrt),
  s = sqrt(lambda). It contains no eigenvalue differences, so it is exact and finite for
  repeated eigenvalues (identity input included).
* ``"taylor"``: the paper's Eqs. 5-7 with K_ij = 1/(lambda_i - lambda_j) replaced by its
  degree-``taylor_degree`` Taylor series (ref [46]); bounded at ties, biased near them.

Clamped eigenvalues: both rules are evaluated at the clamped spectrum, i.e. they return the
gradient of P' = U diag(max(lambda, floor)) U^T's function, treating the floor (which depends
on lambda_max) as a constant. Where no eigenvalue is clamped this is the exact gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from svdcond_jax.solvers._common import Array, eigh, mm, mT, reconstruct, scale_cols, sym

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
    """Clamp ascending eigenvalues (..., d) at ``eig_floor * lambda_max``.

    For an all-zero (or negative semi-definite) matrix lambda_max <= 0 and the scale 1 is
    used instead, so the floor is ``eig_floor`` itself and the output stays finite.
    """
    lam_max = lam[..., -1:]
    scale = jnp.where(lam_max > 0, lam_max, jnp.ones_like(lam_max))
    floor = jax.lax.stop_gradient(eig_floor * scale)
    return jnp.maximum(lam, floor)


def _eigh(p: Array, eig_floor: float) -> tuple[Array, Array]:
    """Eigenvectors u (..., d, d) and clamped sqrt-eigenvalues s (..., d) of symmetric p."""
    lam, u = eigh(p)
    return u, jnp.sqrt(clamp_eigenvalues(lam, eig_floor))


def _outputs(u: Array, s: Array, want_sqrt: bool, want_inv: bool):
    q = reconstruct(u, s) if want_sqrt else None
    inv = reconstruct(u, 1 / s) if want_inv else None
    return q, inv


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


def _exact_grad(u: Array, s: Array, g_sqrt: Array | None, g_inv: Array | None) -> Array:
    """Daleckii-Krein gradient with the closed-form divided differences (docs/meta_layer.md)."""
    si, sj = s[..., :, None], s[..., None, :]
    inner = 0
    if g_sqrt is not None:
        inner = inner + mm(mT(u), mm(sym(g_sqrt), u)) / (si + sj)
    if g_inv is not None:
        inner = inner - mm(mT(u), mm(sym(g_inv), u)) / (si * sj * (si + sj))
    return mm(u, mm(inner, mT(u)))


def _taylor_grad(
    u: Array, s: Array, g_sqrt: Array | None, g_inv: Array | None, degree: int
) -> Array:
    """The paper's Eqs. 5-7 with Taylor K; returns the symmetric part (A + A^T)/2 of Eq. 8."""
    lam = s * s
    dl_du = 0
    dl_dlam = 0
    for g, power in ((g_sqrt, 0.5), (g_inv, -0.5)):
        if g is None:
            continue
        g2 = g + mT(g)
        dl_du = dl_du + scale_cols(mm(g2, u), s**(2 * power))  # Eq. 5
        diag = jnp.diagonal(mm(mT(u), mm(g, u)), axis1=-2, axis2=-1)
        dl_dlam = dl_dlam + power * lam ** (power - 1) * diag  # Eq. 6
    kt = mT(_taylor_k(lam, degree))
    inner = kt * mm(mT(u), dl_du)
    inner = inner + dl_dlam[..., None] * jnp.eye(lam.shape[-1], dtype=lam.dtype)
    return sym(mm(u, mm(inner, mT(u))))  # Eq. 7, symmetrised as in Eq. 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _eigh_custom(
    p: Array, want_sqrt: bool, want_inv: bool, eig_floor: float, backward: str, degree: int
):
    u, s = _eigh(p, eig_floor)
    return _outputs(u, s, want_sqrt, want_inv)


def _eigh_custom_fwd(p, want_sqrt, want_inv, eig_floor, backward, degree):
    u, s = _eigh(p, eig_floor)
    return _outputs(u, s, want_sqrt, want_inv), (u, s)


def _eigh_custom_bwd(want_sqrt, want_inv, eig_floor, backward, degree, res, cts):
    u, s = res
    g_sqrt, g_inv = cts
    if backward == "exact":
        return (_exact_grad(u, s, g_sqrt, g_inv),)
    return (_taylor_grad(u, s, g_sqrt, g_inv, degree),)


_eigh_custom.defvjp(_eigh_custom_fwd, _eigh_custom_bwd)


def matrix_functions(
    p: Array,
    *,
    want_sqrt: bool,
    want_inv: bool,
    backward: str = "exact",
    taylor_degree: int = 100,
    eig_floor: float | None = None,
) -> tuple[Array | None, Array | None]:
    """P^{1/2} and/or P^{-1/2} from one eigendecomposition (Eqs. 3-4), custom backward.

    Args:
      p: symmetric PSD batch (..., d, d), float32 or float64.
      want_sqrt: return P^{1/2}.
      want_inv: return P^{-1/2}.
      backward: "exact" (closed-form Daleckii-Krein) or "taylor" (Eqs. 5-7, ref [46]).
      taylor_degree: degree of the Taylor series of K (used by backward="taylor").
      eig_floor: relative eigenvalue floor; None -> machine eps of p's dtype.

    Returns:
      (sqrt or None, inverse sqrt or None).
    """
    floor = default_eig_floor(p.dtype) if eig_floor is None else float(eig_floor)
    return _eigh_custom(p, want_sqrt, want_inv, floor, backward, int(taylor_degree))


def autodiff_matrix_functions(
    p: Array, *, want_sqrt: bool, want_inv: bool, eig_floor: float | None = None
) -> tuple[Array | None, Array | None]:
    """Same forward as :func:`matrix_functions`, plain autodiff through ``jnp.linalg.eigh``.

    The failing baseline: its backward divides by eigenvalue differences, so it is NaN for an
    identity or any repeated eigenvalue (measured with jax 0.10.2).
    """
    floor = default_eig_floor(p.dtype) if eig_floor is None else float(eig_floor)
    u, s = _eigh(p, floor)
    return _outputs(u, s, want_sqrt, want_inv)
