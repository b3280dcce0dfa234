"""MPA-Lya: [5/5] Pade forward, Lyapunov derivative (docs/meta_layer.md).

Forward: A = P / ||P||_F, Z = I - A, sqrt(A) ~ Q(Z)^{-1} P(Z) with the [5/5] Pade
approximant of sqrt(1 - z); P^{1/2} = sqrt(||P||_F) solve(Q, P) and
P^{-1/2} = solve(P, Q) / sqrt(||P||_F). An input that is not PSD (the Cholesky factorisation
of P + sqrt(eps) ||P||_F I fails, i.e. lambda_min < -sqrt(eps) ||P||_F) gives NaN.

Derivative (``jax.custom_jvp``, forward and reverse mode): dQ = X solving the Lyapunov
equation P^{1/2} X + X P^{1/2} = sym(dP) (the exact derivative of the square root), by
``lyapunov_iters`` coupled Newton-Schulz steps on the sign function of [[B, C], [0, -B]]:
B_0 = P^{1/2}/sqrt(||P||_F), C_0 = sym(dP)/sqrt(||P||_F); B <- B(3I - B^2)/2,
C <- (C(3I - B^2) - B^2 C + B C B)/2; X = C/2. The inverse square root follows from
dS = -S dQ S (S = Q^{-1}). The Lyapunov operator X -> QX + XQ is self-adjoint and so is
every step of the iteration (all are polynomials in left and right products by B), so the
solve is a ``jax.lax.custom_linear_solve(..., symmetric=True)``: reverse mode runs the same
iteration on the cotangent (MPA-Lya's backward) and stores no per-iteration residuals.
The derivative is that of the exact square root evaluated at the Pade forward, not the
derivative of the Pade polynomial itself; it is accurate where the Pade forward is
(well-conditioned P) and the Newton-Schulz sign iteration has converged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from svdcond_jax.solvers._common import (
    Array,
    eye_like,
    frobenius,
    map_matrices,
    mm,
    nan_where,
    not_psd,
    sym,
)

# Coefficients of the numerator P(z) and denominator Q(z) of the [5/5] Pade approximant of
# sqrt(1 - z), lowest degree first (MPA-Lya, Song et al., ICLR 2022).
PADE_P = (1.0, -2.75, 2.75, -1.203125, 0.21484375, -0.0107421875)
PADE_Q = (1.0, -2.25, 1.75, -0.546875, 0.05859375, -0.0009765625)


def _polynomial(z: Array, coeffs: tuple[float, ...]) -> Array:
    """sum_k coeffs[k] Z^k by Horner's rule."""
    eye = eye_like(z)
    out = coeffs[-1] * jnp.broadcast_to(eye, z.shape)
    for c in reversed(coeffs[:-1]):
        out = mm(out, z) + c * eye
    return out


def _forward(p: Array, want_inv: bool) -> tuple[Array, Array | None, Array, Array]:
    """Pade square root q, inverse square root (or None), sqrt(||P||_F) and the not-PSD mask."""
    norm = frobenius(p)
    bad = not_psd(p, norm)
    safe = jnp.where(norm > 0, norm, 1)[..., None, None]  # the zero matrix: A = 0, q = 0
    z = eye_like(p) - p / safe
    num, den = _polynomial(z, PADE_P), _polynomial(z, PADE_Q)
    root_norm = jnp.sqrt(norm)[..., None, None]
    q = nan_where(bad, map_matrices(jnp.linalg.solve, den, num) * root_norm)
    inv = nan_where(bad, map_matrices(jnp.linalg.solve, num, den) / root_norm) if want_inv else None
    return q, inv, root_norm, bad


def lyapunov_newton_schulz(b: Array, c: Array, num_iters: int) -> Array:
    """Solve B X + X B = C for SPD B with eigenvalues in (0, sqrt 2) (coupled Newton-Schulz)."""
    eye = eye_like(b)
    for _ in range(num_iters):
        b2 = mm(b, b)
        c = (mm(c, 3 * eye - b2) - mm(b2, c) + mm(b, mm(c, b))) / 2
        b = mm(b, 3 * eye - b2) / 2
    return c / 2


def sqrt_derivative(q: Array, root_norm: Array, dp: Array, lyapunov_iters: int) -> Array:
    """X with Q X + X Q = sym(dP): the derivative of P^{1/2} along dP (self-adjoint in dP)."""
    b = q / root_norm
    return jax.lax.custom_linear_solve(
        lambda x: mm(b, x) + mm(x, b),
        sym(dp) / root_norm,
        lambda _, c: lyapunov_newton_schulz(b, c, lyapunov_iters),
        symmetric=True,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _pade_custom(p: Array, want_sqrt: bool, want_inv: bool, lyapunov_iters: int):
    q, inv, _, _ = _forward(p, want_inv)
    return (q if want_sqrt else None), inv


@_pade_custom.defjvp
def _pade_custom_jvp(want_sqrt, want_inv, lyapunov_iters, primals, tangents):
    (p,), (dp,) = primals, tangents
    q, inv, root_norm, bad = _forward(p, want_inv)
    dq = nan_where(bad, sqrt_derivative(q, root_norm, dp, lyapunov_iters))
    dinv = -mm(inv, mm(dq, inv)) if want_inv else None
    return ((q if want_sqrt else None), inv), ((dq if want_sqrt else None), dinv)


def matrix_functions(
    p: Array, *, want_sqrt: bool, want_inv: bool, lyapunov_iters: int = 8
) -> tuple[Array | None, Array | None]:
    """P^{1/2} and/or P^{-1/2} by MPA (Pade) with the Lyapunov (MPA-Lya) derivative.

    Args:
      p: symmetric batch (..., d, d), float32 or float64.
      want_sqrt: return the square root.
      want_inv: return the inverse square root.
      lyapunov_iters: coupled Newton-Schulz steps of the Lyapunov solve (>= 1).

    Returns:
      (sqrt or None, inverse sqrt or None); NaN for the matrices that are not PSD.
    """
    return _pade_custom(p, want_sqrt, want_inv, int(lyapunov_iters))
