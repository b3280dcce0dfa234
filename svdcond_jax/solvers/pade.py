"""MPA-Lya: [5/5] Pade forward, Lyapunov backward (docs/meta_layer.md).

Forward: A = P / ||P||_F, Z = I - A, sqrt(A) ~ Q(Z)^{-1} P(Z) with the [5/5] Pade
approximant of sqrt(1 - z); P^{1/2} = sqrt(||P||_F) solve(Q, P) and
P^{-1/2} = solve(P, Q) / sqrt(||P||_F).

Backward (``jax.custom_vjp``): dl/dP = X solving the Lyapunov equation
P^{1/2} X + X P^{1/2} = sym(G) (the exact adjoint of the square root), by ``lyapunov_iters``
coupled Newton-Schulz steps on the sign function of [[B, C], [0, -B]]:
B_0 = P^{1/2}/sqrt(||P||_F), C_0 = G/sqrt(||P||_F); B <- B(3I - B^2)/2,
C <- (C(3I - B^2) - B^2 C + B C B)/2; X = C/2.
The inverse square root's cotangent G_S is mapped onto the square root with
dS = -S dQ S (S = Q^{-1}), i.e. G_Q += -S sym(G_S) S, so both outputs share one Lyapunov
solve. The backward is the exact gradient of the exact square root evaluated at the Pade
forward, not the derivative of the Pade polynomial itself; it is accurate where the Pade
forward is (well-conditioned P) and the Newton-Schulz sign iteration has converged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from svdcond_jax.solvers._common import Array, eye_like, mm, sym

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


def _forward(p: Array, want_sqrt: bool, want_inv: bool):
    norm = jnp.linalg.norm(p, axis=(-2, -1), keepdims=True)
    z = eye_like(p) - p / norm
    num, den = _polynomial(z, PADE_P), _polynomial(z, PADE_Q)
    root_norm = jnp.sqrt(norm)
    sqrt_a = jnp.linalg.solve(den, num)
    q = sqrt_a * root_norm
    inv = jnp.linalg.solve(num, den) / root_norm if want_inv else None
    return q, inv, root_norm


def lyapunov_newton_schulz(b: Array, c: Array, num_iters: int) -> Array:
    """Solve B X + X B = C for SPD B with eigenvalues in (0, sqrt 2) (coupled Newton-Schulz)."""
    eye = eye_like(b)
    for _ in range(num_iters):
        b2 = mm(b, b)
        c = (mm(c, 3 * eye - b2) - mm(b2, c) + mm(b, mm(c, b))) / 2
        b = mm(b, 3 * eye - b2) / 2
    return c / 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _pade_custom(p: Array, want_sqrt: bool, want_inv: bool, lyapunov_iters: int):
    q, inv, _ = _forward(p, want_sqrt, want_inv)
    return (q if want_sqrt else None), inv


def _pade_fwd(p, want_sqrt, want_inv, lyapunov_iters):
    q, inv, root_norm = _forward(p, want_sqrt, want_inv)
    return ((q if want_sqrt else None), inv), (q, inv, root_norm)


def _pade_bwd(want_sqrt, want_inv, lyapunov_iters, res, cts):
    q, inv, root_norm = res
    g_sqrt, g_inv = cts
    g = jnp.zeros_like(q)
    if g_sqrt is not None:
        g = g + sym(g_sqrt)
    if g_inv is not None:
        g = g - mm(inv, mm(sym(g_inv), inv))
    x = lyapunov_newton_schulz(q / root_norm, g / root_norm, lyapunov_iters)
    return (sym(x),)


_pade_custom.defvjp(_pade_fwd, _pade_bwd)


def matrix_functions(
    p: Array, *, want_sqrt: bool, want_inv: bool, lyapunov_iters: int = 8
) -> tuple[Array | None, Array | None]:
    """P^{1/2} and/or P^{-1/2} by MPA (Pade) with the Lyapunov (MPA-Lya) backward.

    Args:
      p: symmetric PSD batch (..., d, d), float32 or float64.
      want_sqrt: return the square root.
      want_inv: return the inverse square root.
      lyapunov_iters: coupled Newton-Schulz steps of the backward Lyapunov solve (>= 1).

    Returns:
      (sqrt or None, inverse sqrt or None).
    """
    return _pade_custom(p, want_sqrt, want_inv, int(lyapunov_iters))

