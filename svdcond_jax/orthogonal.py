"""Orthogonalisation helpers shared by NOG and the Pre-SVD weight treatments.

Pure functions, no Flax and no optax:

* :func:`as_matrix` maps a kernel to the matrix the paper reasons about (and back);
* :func:`polar_factor` is the nearest orthogonal matrix ``U V^T`` (Eqs. 14-17), exact via
  the SVD or approximate via a cubic Newton-Schulz iteration;
* :func:`orthogonality_loss` is the soft orthogonality penalty of Eq. 12;
* :func:`skew_symmetric_expm` is the orthogonal parametrisation ``exp(A - A^T)`` of Eq. 13.

See docs/nog_olr.md and docs/weight_treatments.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "POLAR_METHODS",
    "as_matrix",
    "orthogonality_loss",
    "polar_factor",
    "skew_symmetric_expm",
]

POLAR_METHODS = ("svd", "newton_schulz")

# Default Newton-Schulz iteration count: float32 round-off up to kappa ~1e6 (measured, see the
# table in `polar_factor`).
_DEFAULT_NS_ITERS = 40


def as_matrix(x: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Reshapes a kernel to ``(prod(shape[:-1]), shape[-1])`` and returns the inverse map.

    A Flax dense kernel ``(in, out)`` is unchanged; an HWIO conv kernel ``(kh, kw, in, out)``
    becomes ``(kh*kw*in, out)``. This is the transpose of the reference's
    ``(out, in*kh*kw)`` up to a row permutation, which the polar factor commutes with
    (docs/nog_olr.md).

    Args:
      x: array with ``x.ndim >= 2``.

    Returns:
      ``(matrix, inverse)`` where ``inverse(matrix)`` has ``x``'s shape.

    Raises:
      ValueError: if ``x.ndim < 2``.

    Example:
      >>> import jax.numpy as jnp
      >>> m, back = as_matrix(jnp.zeros((3, 3, 4, 8)))
      >>> m.shape, back(m).shape
      ((36, 8), (3, 3, 4, 8))
    """
    if x.ndim < 2:
        raise ValueError(f"as_matrix: x must have ndim >= 2, got {x.shape=}")
    shape = x.shape
    matrix = jnp.reshape(x, (math.prod(shape[:-1]), shape[-1]))

    def inverse(m: jax.Array) -> jax.Array:
        return jnp.reshape(m, shape)

    return matrix, inverse


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _polar_svd(m: jax.Array) -> jax.Array:
    u, _, vt = jnp.linalg.svd(m, full_matrices=False)
    q = u @ vt
    nonzero = jnp.any(m != 0, axis=(-2, -1), keepdims=True)
    return jnp.where(nonzero, q, jnp.zeros_like(q))


def _polar_newton_schulz(m: jax.Array, num_iters: int) -> jax.Array:
    tall = m.shape[-2] >= m.shape[-1]
    x = m if tall else _mT(m)  # work on the tall orientation: the Gram X^T X is the small one
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    x = x / jnp.where(norm > 0, norm, jnp.ones_like(norm))  # sigma_max(X0) <= 1 < sqrt(3)

    def body(_: int, x: jax.Array) -> jax.Array:
        return 1.5 * x - 0.5 * x @ (_mT(x) @ x)

    x = jax.lax.fori_loop(0, num_iters, body, x)
    return x if tall else _mT(x)


def polar_factor(
    m: jax.Array, *, method: str = "svd", num_iters: int = _DEFAULT_NS_ITERS
) -> jax.Array:
    """Nearest orthogonal matrix ``R = U V^T`` of ``m = U S V^T`` (Eqs. 14-17).

    ``R`` minimises ``||m - R||_F`` over matrices with orthonormal rows or columns (the
    polar factor); all its singular values are 1. A zero matrix maps to a zero matrix (never
    NaN). Rank-deficient inputs get singular values 1 on the thin SVD's subspace for
    ``"svd"``; ``"newton_schulz"`` leaves exactly-zero singular values at 0.

    Methods:
      * ``"svd"``: exact, ``U V^T`` from ``jnp.linalg.svd(m, full_matrices=False)``.
      * ``"newton_schulz"``: cubic Newton-Schulz ``X <- 1.5 X - 0.5 X X^T X`` started from
        ``X0 = m / ||m||_F`` (so every singular value lies in (0, 1] < sqrt(3), where the
        iteration converges to 1). Each singular value grows by about 1.5x per iteration
        while small, then converges quadratically, so the cost grows with
        ``log(||m||_F / sigma_min(m))``. Measured max |sigma - 1| in float32 on CPU
        (worst of 3 random inputs, singular values log-spaced in [1/kappa, 1]; measured with
        a float64 SVD of the float32 output; ``||m||_F / sigma_min(m)`` is about 2.7 kappa):

        ==========  =======  =======  =======  =======  =======  =======
        kappa       10       100      1e3      1e4      1e5      1e6
        ==========  =======  =======  =======  =======  =======  =======
        10 iters    5.6e-2   7.9e-1   9.7e-1   1.0      -        -
        20 iters    1.6e-7   1.5e-7   6.7e-2   8.3e-1   -        -
        30 iters    1.8e-7   1.5e-7   1.6e-7   2.0e-7   1.9e-1   8.9e-1
        40 iters    1.6e-7   1.6e-7   1.8e-7   1.7e-7   1.8e-7   1.7e-7
        ==========  =======  =======  =======  =======  =======  =======

        for a 64x64 input; a 27x64 input behaves alike (20 iters: 1.3e-7 at kappa 10,
        8.7e-3 at 1e3; 30 iters: <= 1.4e-7 up to 1e4). The default, 40 iterations, reaches
        float32 round-off up to kappa ~1e6; each extra decade of kappa costs ~6 iterations.
        (``tests/test_orthogonal.py`` re-measures the kappa <= 100 cells.) Unlike optax's
        Muon quintic iteration, which stops with singular values roughly in [0.5, 1.5], this
        one converges to exactly 1.

    Args:
      m: array of shape ``(..., rows, cols)``.
      method: ``"svd"`` or ``"newton_schulz"``.
      num_iters: Newton-Schulz iterations (ignored by ``"svd"``).

    Returns:
      Array of ``m``'s shape and dtype with singular values 1 (or 0 for a zero matrix).

    Raises:
      ValueError: on ``m.ndim < 2``, an unknown ``method`` or ``num_iters < 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> r = polar_factor(jnp.array([[2.0, 0.0], [0.0, 0.5]]))
      >>> r.tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    if m.ndim < 2:
        raise ValueError(f"polar_factor: m must have ndim >= 2, got {m.shape=}")
    if method == "svd":
        return _polar_svd(m)
    if method == "newton_schulz":
        if num_iters < 0:
            raise ValueError(f"polar_factor: num_iters must be >= 0, got {num_iters=}")
        return _polar_newton_schulz(m, num_iters)
    raise ValueError(f"polar_factor: unknown {method=}; valid methods are {POLAR_METHODS}")


def orthogonality_loss(w: jax.Array) -> jax.Array:
    """Soft orthogonality penalty ``||W W^T - I||_F`` (Eq. 12).

    ``w`` is reshaped with :func:`as_matrix` to ``M`` of shape ``(K, out)``,
    ``K = prod(shape[:-1])``. The paper's ``W`` is ``M^T`` (``out x K``, one row per output
    feature), so Eq. 12's Gram is ``W W^T = M^T M`` (``out x out``). That Gram can only
    reach the identity when ``out <= K``; for a wide paper-``W`` (``out > K``, e.g. the
    CIFAR stem's 27 x 64 matrix seen as 64 x 27) the loss uses the other, smaller Gram
    ``M M^T`` (``K x K``) instead. In both cases the loss is 0 exactly when the matrix has
    orthonormal rows or columns (whichever are fewer).

    Args:
      w: kernel with ``w.ndim >= 2``.

    Returns:
      Scalar loss.

    Example:
      >>> import jax.numpy as jnp
      >>> float(orthogonality_loss(jnp.eye(3)[:, :2]))
      0.0
    """
    m, _ = as_matrix(w)
    gram = _mT(m) @ m if m.shape[-1] <= m.shape[-2] else m @ _mT(m)
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    return jnp.sqrt(jnp.sum(jnp.square(gram - eye)))


def skew_symmetric_expm(a: jax.Array) -> jax.Array:
    """Orthogonal matrix ``exp(A - A^T)`` of a square ``A`` (Eq. 13).

    Args:
      a: array of shape ``(..., n, n)``.

    Returns:
      Orthogonal array of ``a``'s shape.

    Raises:
      ValueError: if ``a`` is not square.

    Example:
      >>> import jax.numpy as jnp
      >>> q = skew_symmetric_expm(jnp.array([[0.0, 1.0], [0.0, 0.0]]))
      >>> bool(jnp.allclose(q @ q.T, jnp.eye(2), atol=1e-6))
      True
    """
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"skew_symmetric_expm: a must be square (..., n, n), got {a.shape=}")
    return jax.scipy.linalg.expm(a - _mT(a))
