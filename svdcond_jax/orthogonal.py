"""Orthogonalisation helpers shared by NOG and the Pre-SVD weight treatments.

Pure functions, no Flax and no optax:

* :func:`as_matrix` maps a kernel to the matrix the paper reasons about (and back);
* :func:`polar_factor` is the nearest orthogonal matrix ``U V^T`` (Eqs. 14-17), exact via
  the SVD, converged via a Newton-Schulz iteration, or fast via five tuned quintic steps
  (``"polar_express"``), rank-aware in all three; ``"muon"`` is optax.contrib.muon's
  approximation, for comparison;
* :func:`orthogonality_loss` is the soft orthogonality penalty of Eq. 12;
* :func:`skew_symmetric_expm` is the orthogonal parametrisation ``exp(A - A^T)`` of Eq. 13.

See docs/nog_olr.md and docs/weight_treatments.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdcond_jax.solvers._common import (
    finite_or_zero,
    frobenius,
    map_matrices,
    mm,
    mT,
    nan_where,
)

__all__ = [
    "POLAR_METHODS",
    "as_matrix",
    "orthogonality_loss",
    "polar_factor",
    "skew_symmetric_expm",
]

POLAR_METHODS = ("svd", "newton_schulz", "polar_express", "muon")

# "polar_express": five odd quintic steps X <- X (a I + b A + c A^2), A = X^T X, derived and
# checked by benchmarks/polar_coefficients.py (greedy minimax on [3e-3, 1.01], 1% cushion).
POLAR_EXPRESS_COEFFS = (
    (8.301929503456787, -24.04243023240437, 17.46994329070012),
    (4.010227631797755, -2.9290201053457796, 0.5429868718678025),
    (3.502548679977901, -2.5771760637698975, 0.5049122671754007),
    (2.522669736637919, -1.8391980024138188, 0.4271075254971938),
    (1.9278159201215483, -1.3033701473358166, 0.3770510170640873),
)
# Singular values sigma >= POLAR_EXPRESS_LOW * s (s >= sigma_max, see polar_factor) end within
# POLAR_EXPRESS_ERROR of 1 (float64 bound; measured 7.52e-3 on a million points).
POLAR_EXPRESS_LOW = 3e-3
POLAR_EXPRESS_ERROR = 7.6e-3
# The smallest (and default) cutoff: every sigma <= POLAR_EXPRESS_RTOL * s ends <= 1e-2.
POLAR_EXPRESS_RTOL = 1.76e-5
# "muon": optax.contrib.muon's Newton-Schulz (Frobenius normalisation, five quintic steps).
MUON_COEFFS = (3.4445, -4.7750, 2.0315)
MUON_STEPS = 5

# Newton-Schulz: iterations of the rounding phase (see `polar_factor`), and the default
# iteration count when rtol=0 (no cutoff).
_SNAP_ITERS = 10
_NO_CUTOFF_ITERS = 40
# Repeated squarings of the Gram for the sigma_max bound: within rank^(1/128) (< 7% for
# rank <= 4096) of sigma_max.
_SQUARINGS = 6
# The rounding map s -> 2.5 s^3 - 1.5 s^5 sends (0, sqrt(2/3)) to 0 and (sqrt(2/3), 1] to 1.
_SNAP_POINT = math.sqrt(2.0 / 3.0)


# ----------------------------------------------------------------------------- validation


def _as_float_array(name: str, a: Any, fn: str) -> jax.Array:
    """``a`` as a real floating jax array, else TypeError naming the argument."""
    try:
        arr = jnp.asarray(a)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{fn}: {name} must be a real floating array; got "
                        f"{type(a).__name__}") from err
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be a real floating array; got {name}.dtype="
                        f"{arr.dtype}; cast with .astype(jnp.float32)")
    return arr


def _check_matrix(name: str, a: jax.Array, fn: str, square: bool = False) -> None:
    shape = a.shape
    bad = len(shape) < 2 or min(shape[-2:]) < 1 or (square and shape[-1] != shape[-2])
    if bad:
        want = "(..., n, n), n >= 1" if square else "(..., rows, cols), rows, cols >= 1"
        raise ValueError(f"{fn}: {name} must have shape {want}; got {name}.shape={shape}")


def _compute_dtype(dtype: Any) -> Any:
    """bfloat16/float16 compute in float32; float32/float64 in their own precision."""
    return jnp.promote_types(dtype, jnp.float32)


def _check_polar_options(method: Any, num_iters: Any, rtol: Any,
                         matmul_dtype: Any = None) -> None:
    if not isinstance(method, str):
        raise TypeError(f"polar_factor: method must be a str, one of {POLAR_METHODS}; "
                        f"got method={method!r}")
    if method not in POLAR_METHODS:
        raise ValueError(f"polar_factor: unknown method={method!r}; valid methods are "
                         f"{POLAR_METHODS}")
    if matmul_dtype is not None:
        if method not in ("polar_express", "muon"):
            raise ValueError("polar_factor: matmul_dtype is an option of method="
                             f"'polar_express' or 'muon'; got method={method!r}")
        try:
            ok = jnp.issubdtype(jnp.dtype(matmul_dtype), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise TypeError("polar_factor: matmul_dtype must be None or a floating dtype "
                            f"such as jnp.bfloat16; got matmul_dtype={matmul_dtype!r}")
    if num_iters is not None:
        if method in ("svd", "polar_express"):
            raise ValueError("polar_factor: num_iters is an option of method='newton_schulz' "
                             f"or 'muon'; method={method!r} has a fixed schedule (got "
                             f"num_iters={num_iters!r})")
        if isinstance(num_iters, bool) or not isinstance(num_iters, (int, np.integer)):
            raise TypeError("polar_factor: num_iters must be a static Python int >= 1; got "
                            f"num_iters={num_iters!r} ({type(num_iters).__name__})")
        if num_iters < 1:
            raise ValueError(f"polar_factor: num_iters must be >= 1; got num_iters={num_iters}")
    if rtol is not None:
        if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real):
            raise TypeError("polar_factor: rtol must be None or a static Python float in "
                            f"[0, 1); got rtol={rtol!r} ({type(rtol).__name__})")
        if not 0 <= rtol < 1:
            raise ValueError(f"polar_factor: rtol must be in [0, 1); got rtol={rtol!r}")
        if method == "muon":
            raise ValueError("polar_factor: method='muon' has no cutoff (it is optax's "
                             f"iteration as is); got rtol={rtol!r}")
        high = POLAR_EXPRESS_RTOL / POLAR_EXPRESS_LOW
        if method == "polar_express" and not POLAR_EXPRESS_RTOL <= rtol < high:
            raise ValueError(
                f"polar_factor: method='polar_express' resolves cutoffs rtol in "
                f"[{POLAR_EXPRESS_RTOL:g}, {high:.3g}) (five steps cannot lift a smaller "
                f"singular value to 1); got rtol={rtol!r}: use method='newton_schulz' or "
                "'svd' for it")


# ----------------------------------------------------------------------------- as_matrix


def as_matrix(x: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Reshapes a kernel to ``(prod(shape[:-1]), shape[-1])`` and returns the inverse map.

    A Flax dense kernel ``(in, out)`` is unchanged; an HWIO conv kernel ``(kh, kw, in, out)``
    becomes ``(kh*kw*in, out)``. This is the transpose of the reference's
    ``(out, in*kh*kw)`` up to a row permutation, which the polar factor commutes with
    (docs/nog_olr.md). A pure reshape: any dtype, values untouched.

    Args:
      x: array (or array-like) with ``x.ndim >= 2``.

    Returns:
      ``(matrix, inverse)`` where ``inverse(matrix)`` has ``x``'s shape.

    Raises:
      ValueError: if ``x.ndim < 2``.
      TypeError: if ``x`` is not an array (e.g. a string).

    Example:
      >>> import jax.numpy as jnp
      >>> m, back = as_matrix(jnp.zeros((3, 3, 4, 8)))
      >>> m.shape, back(m).shape
      ((36, 8), (3, 3, 4, 8))
    """
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"as_matrix: x must be an array; got {type(x).__name__}") from err
    if x.ndim < 2:
        raise ValueError(f"as_matrix: x must have ndim >= 2; got x.shape={x.shape}")
    shape = x.shape
    matrix = jnp.reshape(x, (math.prod(shape[:-1]), shape[-1]))

    def inverse(m: jax.Array) -> jax.Array:
        return jnp.reshape(m, shape)

    return matrix, inverse


# ----------------------------------------------------------------------------- polar factor


def default_rtol(rows: int, cols: int, dtype: Any) -> float:
    """The default relative cutoff of :func:`polar_factor`: max(rows, cols) * eps(dtype).

    NumPy's ``matrix_rank`` tolerance: the singular values of a matrix stored in floating
    point carry errors of about eps * sigma_max times a factor growing with its size, so
    those below ``max(rows, cols) * eps * sigma_max`` are indistinguishable from 0 (3.2e-6
    for a 27 x 16 float32 matrix).
    """
    return max(rows, cols) * float(jnp.finfo(_compute_dtype(dtype)).eps)


def _polar_svd(m: jax.Array, rtol: float) -> jax.Array:
    """U diag(1[s > rtol s_max]) V^T from the thin SVD."""
    u, s, vt = map_matrices(lambda a: tuple(jnp.linalg.svd(a, full_matrices=False)), m)
    keep = s > rtol * s[..., :1]  # the zero matrix keeps nothing
    return mm(u * keep.astype(u.dtype)[..., None, :], vt)


def _sigma_max_bound(x: jax.Array) -> jax.Array:
    """An upper bound of sigma_max(x), (..., 1, 1), within rank^(1/128) of it.

    With A = X^T X and t_j = tr(A^(2^j)): sigma_max^(2^(j+1)) <= t_j <= rank sigma_max^(...),
    t_j from repeated squaring of the trace-normalised Gram (no overflow).
    """
    def trace(a: jax.Array) -> jax.Array:
        return jnp.trace(a, axis1=-2, axis2=-1)[..., None, None]

    b = mm(mT(x), x)
    t = trace(b)
    log_t = jnp.log(t)  # -inf for the zero matrix: bound 0
    b = b / jnp.where(t > 0, t, 1)
    for _ in range(_SQUARINGS):
        b = mm(b, b)
        c = trace(b)
        log_t = 2 * log_t + jnp.log(jnp.where(c > 0, c, 1))
        b = b / jnp.where(c > 0, c, 1)
    return jnp.exp(log_t / 2 ** (_SQUARINGS + 1))


def _cubic(x: float) -> float:
    return 1.5 * x - 0.5 * x**3


def newton_schulz_schedule(rtol: float, num_iters: int | None) -> tuple[float, int, int]:
    """(start scale alpha, cubic steps, rounding steps) of the rank-aware Newton-Schulz.

    The cubic phase needs n steps to lift a singular value rtol * s to sqrt(2/3), the
    repelling fixed point of the rounding map; alpha in (2/3, 1] makes it land there
    exactly, so the cutoff is rtol * s (s the sigma_max bound). ``num_iters=None``: n
    cubic steps and 10 rounding steps (or 40 cubic steps when rtol = 0).
    """
    if rtol == 0:
        return 1.0, _NO_CUTOFF_ITERS if num_iters is None else num_iters, 0
    n, x = 0, rtol
    while x < _SNAP_POINT:
        n, x = n + 1, _cubic(x)
    lo, hi = 0.0, 1.0  # bisection for g^n(alpha rtol) = sqrt(2/3), g^n increasing
    for _ in range(80):
        mid = (lo + hi) / 2
        y = mid * rtol
        for _ in range(n):
            y = _cubic(y)
        lo, hi = (mid, hi) if y < _SNAP_POINT else (lo, mid)
    total = n + _SNAP_ITERS if num_iters is None else num_iters
    return (lo + hi) / 2, min(n, total), max(total - n, 0)


def _polar_newton_schulz(m: jax.Array, num_iters: int | None, rtol: float) -> jax.Array:
    tall = m.shape[-2] >= m.shape[-1]
    x = m if tall else mT(m)  # work on the tall orientation: the Gram X^T X is the small one
    big = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    x = x / jnp.where(big > 0, big, 1)  # no overflow in the Gram
    alpha, cubic_steps, snap_steps = newton_schulz_schedule(rtol, num_iters)
    bound = _sigma_max_bound(x)
    x = x * (alpha / jnp.where(bound > 0, bound, 1))  # singular values in [0, 1]

    def cubic(_: int, x: jax.Array) -> jax.Array:
        return 1.5 * x - 0.5 * mm(x, mm(mT(x), x))

    def snap(_: int, x: jax.Array) -> jax.Array:
        a = mm(mT(x), x)
        return mm(x, 2.5 * a - 1.5 * mm(a, a))

    x = jax.lax.fori_loop(0, cubic_steps, cubic, x)
    x = jax.lax.fori_loop(0, snap_steps, snap, x)
    return x if tall else mT(x)


def _matmul(matmul_dtype: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Batched product: full precision in the operands' dtype, or ``matmul_dtype`` operands
    (e.g. bfloat16) accumulated in the operands' dtype (``preferred_element_type``).

    On CPU, whose XLA runtime lacks some bfloat16 x bfloat16 -> float32 products (jax
    0.10.2: "Unsupported element type for DotThunk"), the operands are rounded to
    ``matmul_dtype`` and multiplied in the operands' dtype instead: the same products (two
    8-bit mantissas multiply exactly in float32), summed in another order.
    """
    if matmul_dtype is None:
        return mm

    def native(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.matmul(a.astype(matmul_dtype), b.astype(matmul_dtype),
                          preferred_element_type=a.dtype)

    def rounded(a: jax.Array, b: jax.Array) -> jax.Array:
        return mm(a.astype(matmul_dtype).astype(a.dtype), b.astype(matmul_dtype).astype(b.dtype))

    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.platform_dependent(a, b, cpu=rounded, default=native)

    return product


def _polar_quintic(m: jax.Array, coeffs: tuple[tuple[float, float, float], ...],
                   scale: str, alpha: float, matmul_dtype: Any) -> jax.Array:
    """Odd quintic steps ``X <- a X + X (b A + c A^2)``, ``A = X^T X``, 3 products each
    (for a wide ``m``, ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``: the same map).

    ``scale="schatten8"``: ``X0 = alpha m / s`` with ``s = ||m||_S8 = ||A^2||_F^(1/4)``
    (of the Frobenius-normalised ``m``), read off the first step's own ``A^2``: no extra
    product. ``scale="frobenius"``: ``X0 = m / ||m||_F`` (optax.contrib.muon's).
    """
    product = _matmul(matmul_dtype)
    if m.shape[-2] >= m.shape[-1]:  # tall: the Gram X^T X is the small one, X <- X B
        gram, times = (lambda x: product(mT(x), x)), (lambda x, b: product(x, b))
    else:  # wide: X X^T, X <- B X (no transposed copies of X)
        gram, times = (lambda x: product(x, mT(x))), (lambda x, b: product(b, x))
    fro = frobenius(m)[..., None, None]  # overflow-safe; singular values now <= 1
    x = m / jnp.where(fro > 0, fro, 1)
    a = gram(x)
    a2 = product(a, a)
    if scale == "schatten8":
        s4 = jnp.sqrt(jnp.sum(jnp.square(a2), axis=(-2, -1), keepdims=True))  # s^4 <= 1
        c = alpha / jnp.sqrt(jnp.sqrt(jnp.where(s4 > 0, s4, 1)))
        x, a, a2 = c * x, c**2 * a, c**4 * a2
    for i, (ca, cb, cc) in enumerate(coeffs):
        if i:
            a = gram(x)
            a2 = product(a, a)
        x = ca * x + times(x, cb * a + cc * a2)
    return x


def polar_factor(
    m: jax.Array,
    *,
    method: str = "svd",
    num_iters: int | None = None,
    rtol: float | None = None,
    matmul_dtype: Any = None,
) -> jax.Array:
    """Nearest orthogonal matrix ``R = U V^T`` of ``m = U S V^T`` (Eqs. 14-17), rank-aware.

    ``R`` minimises ``||m - R||_F`` over matrices with orthonormal rows or columns (the
    polar factor): the paper's NOG sets every singular value of the gradient to 1. That is
    only defined for full-rank ``m``: the singular directions LAPACK returns for (near-)zero
    singular values are rounding noise, and on a rank-deficient gradient (a 27 x 16 stem
    gradient of rank 9) a relative perturbation of 3e-7 changed ``U V^T`` by 0.9 in
    Frobenius norm (docs/nog_olr.md). So singular values ``<= rtol * sigma_max`` map to 0
    instead: ``R = U diag(1[s > rtol sigma_max]) V^T``, the unique minimum-norm partial
    isometry on the numerical range of ``m``, a continuous function of ``m`` away from
    the cutoff, and the limit of the Newton-Schulz iteration below. On full-rank input
    (every singular value above the cutoff, e.g. the reference's CIFAR gradients) this is
    exactly ``U V^T``. The zero matrix maps to the zero matrix.

    Methods:
      * ``"svd"`` (default): exact, from ``jnp.linalg.svd(m, full_matrices=False)``.
      * ``"newton_schulz"``: matrix products only. ``X0 = alpha m / s`` with ``s`` an upper
        bound of sigma_max(m) within rank^(1/128) (a Schatten norm from 6 squarings of the
        Gram), so every singular value lies in [0, 1]. Then ``n`` cubic steps
        ``X <- 1.5 X - 0.5 X X^T X`` (each lifts a small singular value by ~1.5x and
        converges the large ones to 1 quadratically) and rounding steps
        ``X <- X (2.5 A - 1.5 A^2)``, ``A = X^T X`` (singular value
        ``s -> 2.5 s^3 - 1.5 s^5``: below sqrt(2/3) to 0, above it to 1, both
        quadratically). ``n`` and ``alpha`` (in (2/3, 1]) are chosen so that the cutoff
        ``rtol * s`` lands exactly on sqrt(2/3): the iteration converges to the ``"svd"``
        result, except for singular values within about 1% of the cutoff (measured:
        docs/nog_olr.md), and never amplifies rounding noise. ``rtol=0``: no cutoff, cubic
        steps only (every nonzero singular value converges to 1, noise included).
      * ``"polar_express"``: fast, matrix products only, the cost of optax.contrib.muon's
        Newton-Schulz (15 products). ``X0 = alpha m / s`` with ``s = ||m||_S8 =
        (sum sigma_i^8)^(1/8)``, between sigma_max and rank^(1/8) sigma_max, read off the
        first step's ``A^2`` (no extra product); then five odd quintic steps
        ``X <- X (a I + b A + c A^2)``, ``A = X^T X``, whose coefficients
        (``POLAR_EXPRESS_COEFFS``; derived and checked by benchmarks/polar_coefficients.py,
        Polar-Express-style greedy minimax) map every singular value in
        ``[3e-3 s, s]`` to within 7.6e-3 of 1. The composition is ~570 x near 0 and
        increasing below ``3e-3 s``: a singular value ``<= rtol * s`` ends ``<= 1e-2``
        (rounding noise of float32, ~1e-7 s, ends near 6e-5), the rank-aware cut, with a
        transition band ``(rtol, 170 rtol) * s`` in between (``alpha = 1.76e-5 / rtol``
        places the band). bfloat16/float16 ``matmul_dtype`` runs every product in that
        dtype with float32 accumulation (for accelerators; measured on CPU over 14
        ResNet kernel shapes: singular values within 1e-2 to 3e-2 of 1, the bfloat16
        rounding floor, docs/nog_olr.md).
      * ``"muon"``: optax.contrib.muon's iteration as is, for comparison: ``m / ||m||_F``,
        then ``num_iters`` (5) steps of the quintic ``(3.4445, -4.7750, 2.0315)``. Not a
        polar factor: singular values end spread over roughly [0.7, 1.2] (measured,
        docs/nog_olr.md), small ones not lifted; no cutoff (``rtol`` must be None).

    Args:
      m: real floating array of shape ``(..., rows, cols)``, rows, cols >= 1.
      method: ``"svd"``, ``"newton_schulz"``, ``"polar_express"`` or ``"muon"``.
      num_iters: ``"newton_schulz"`` and ``"muon"`` only (an error with the others), int
        >= 1. Newton-Schulz: the total number of steps; the first ``min(n, num_iters)``
        are cubic, the rest rounding steps. None (default): ``n + 10`` (42 for a 27 x 16
        float32 matrix at the default rtol; 40 cubic steps when rtol = 0). Fewer steps
        leave the singular values between ~1.5^-num_iters and the cutoff partly
        converged. Muon: its number of steps (default 5).
      rtol: relative cutoff in [0, 1); None (default) is
        ``max(rows, cols) * eps`` of the compute dtype (NumPy's ``matrix_rank``
        tolerance; 3.2e-6 for a 27 x 16 float32 matrix) for ``"svd"`` and
        ``"newton_schulz"``, and ``1.76e-5`` (relative to ``s``), the smallest it resolves,
        for ``"polar_express"`` (which accepts [1.76e-5, 5.9e-3)).
      matmul_dtype: ``"polar_express"`` and ``"muon"`` only: None (default) multiplies in
        the compute dtype at full precision; a floating dtype (``jnp.bfloat16``) casts the
        operands of every product to it and accumulates in the compute dtype.

    Returns:
      Array of ``m``'s shape and dtype (bfloat16/float16 computed in float32) whose
      singular values are 1 (above the cutoff) or 0. Decided by the values, per matrix:
      NaN where ``m`` has a NaN/Inf entry (such a matrix never reaches LAPACK, whose SVD
      does not return on an Inf entry).

    Raises:
      ValueError: ``m`` not ``(..., rows, cols)`` with rows, cols >= 1; an unknown
        ``method``; ``num_iters < 1`` or given with ``"svd"``/``"polar_express"``; ``rtol``
        outside [0, 1), outside ``"polar_express"``'s range, or given with ``"muon"``;
        ``matmul_dtype`` with ``"svd"``/``"newton_schulz"``.
      TypeError: ``m`` not a real floating array; ``method`` not a str; ``num_iters`` not
        an int (e.g. 2.5, True); ``rtol`` not a real number; ``matmul_dtype`` not a
        floating dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> polar_factor(jnp.array([[2.0, 0.0], [0.0, 0.5]])).tolist()
      [[1.0, 0.0], [0.0, 1.0]]
      >>> polar_factor(jnp.array([[2.0, 0.0], [0.0, 1e-9]])).tolist()  # rank 1
      [[1.0, 0.0], [0.0, 0.0]]
      >>> r = polar_factor(jnp.array([[2.0, 0.0], [0.0, 1e-9]]), method="newton_schulz")
      >>> r.round(5).tolist()
      [[1.0, 0.0], [0.0, 0.0]]
      >>> r = polar_factor(jnp.array([[2.0, 0.0], [0.0, 0.5]]), method="polar_express")
      >>> bool(jnp.allclose(r, jnp.eye(2), atol=1e-2))
      True
    """
    _check_polar_options(method, num_iters, rtol, matmul_dtype)
    m = _as_float_array("m", m, "polar_factor")
    _check_matrix("m", m, "polar_factor")
    dtype = m.dtype
    # A matrix with an Inf entry would hang LAPACK's SVD: it is replaced by 0, then NaN.
    mc, bad = finite_or_zero(m.astype(_compute_dtype(dtype)))
    if method == "polar_express":
        alpha = 1.0 if rtol is None else POLAR_EXPRESS_RTOL / float(rtol)
        r = _polar_quintic(mc, POLAR_EXPRESS_COEFFS, "schatten8", alpha, matmul_dtype)
    elif method == "muon":
        steps = MUON_STEPS if num_iters is None else int(num_iters)
        r = _polar_quintic(mc, (MUON_COEFFS,) * steps, "frobenius", 1.0, matmul_dtype)
    else:
        rtol = default_rtol(*m.shape[-2:], dtype) if rtol is None else float(rtol)
        if method == "svd":
            r = _polar_svd(mc, rtol)
        else:
            r = _polar_newton_schulz(mc, num_iters, rtol)
    return nan_where(bad, r).astype(dtype)


# ----------------------------------------------------------------------------- Eqs. 12-13


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
      w: real floating kernel with ``w.ndim >= 2`` and no zero-size dimension.

    Returns:
      Scalar loss in ``w``'s dtype (bfloat16/float16 computed in float32); NaN, value and
      gradient, if ``w`` has a NaN/Inf entry.

    Raises:
      ValueError: ``w.ndim < 2`` or a zero-size dimension.
      TypeError: ``w`` not a real floating array.

    Example:
      >>> import jax.numpy as jnp
      >>> float(orthogonality_loss(jnp.eye(3)[:, :2]))
      0.0
    """
    w = _as_float_array("w", w, "orthogonality_loss")
    if w.ndim < 2 or 0 in w.shape:
        raise ValueError(f"orthogonality_loss: w must have ndim >= 2 and no zero-size "
                         f"dimension; got w.shape={w.shape}")
    m, _ = as_matrix(w.astype(_compute_dtype(w.dtype)))
    m, bad = finite_or_zero(m)
    gram = mm(mT(m), m) if m.shape[-1] <= m.shape[-2] else mm(m, mT(m))
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    loss = jnp.sqrt(jnp.sum(jnp.square(gram - eye)))
    return nan_where(bad, loss[None, None])[0, 0].astype(w.dtype)


def skew_symmetric_expm(a: jax.Array) -> jax.Array:
    """Orthogonal matrix ``exp(A - A^T)`` of a square ``A`` (Eq. 13).

    Args:
      a: real floating array of shape ``(..., n, n)``, n >= 1.

    Returns:
      Orthogonal array of ``a``'s shape and dtype (bfloat16/float16 computed in float32);
      NaN for a matrix with a NaN/Inf entry.

    Raises:
      ValueError: ``a`` not square ``(..., n, n)`` with n >= 1.
      TypeError: ``a`` not a real floating array.

    Example:
      >>> import jax.numpy as jnp
      >>> q = skew_symmetric_expm(jnp.array([[0.0, 1.0], [0.0, 0.0]]))
      >>> bool(jnp.allclose(q @ q.T, jnp.eye(2), atol=1e-6))
      True
    """
    a = _as_float_array("a", a, "skew_symmetric_expm")
    _check_matrix("a", a, "skew_symmetric_expm", square=True)
    ac, bad = finite_or_zero(a.astype(_compute_dtype(a.dtype)))
    return nan_where(bad, jax.scipy.linalg.expm(ac - mT(ac))).astype(a.dtype)
