"""The SVD meta-layer: covariance (Eq. 2), square root and inverse square root (Eqs. 3-8).

Public API: :func:`covariance`, :func:`sqrtm`, :func:`inv_sqrtm`,
:func:`sqrtm_and_inv_sqrtm`, :data:`METHODS`, :func:`condition_number` (Eq. 1, in jax) and
the host-side float64 monitors :func:`eigvalsh_f64`, :func:`condition_number_f64`. The
methods, their options and the bad-input rules are documented in each function's docstring
(``help(sqrtm)``) and in docs/meta_layer.md.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdcond_jax.solvers import eigh as _eigh_solver
from svdcond_jax.solvers import newton_schulz as _ns_solver
from svdcond_jax.solvers import pade as _pade_solver
from svdcond_jax.solvers._common import (
    HIGHEST,
    finite_or_zero,
    frobenius,
    map_matrices,
    mT,
    nan_tangent_where,
    nan_where,
    psd_tolerance,
    sym,
)

Array = jax.Array

METHODS: tuple[str, ...] = ("eigh", "eigh_autodiff", "newton_schulz", "pade")

LAYOUTS: tuple[str, ...] = ("features_first", "features_last")

_SOLVERS: dict[str, Callable[..., tuple[Array | None, Array | None]]] = {
    "eigh": _eigh_solver.matrix_functions,
    "eigh_autodiff": _eigh_solver.autodiff_matrix_functions,
    "newton_schulz": _ns_solver.matrix_functions,
    "pade": _pade_solver.matrix_functions,
}

_OPTIONS: dict[str, tuple[str, ...]] = {
    "eigh": ("backward", "taylor_degree", "eig_floor"),
    "eigh_autodiff": ("eig_floor",),
    "newton_schulz": ("num_iters",),
    "pade": ("lyapunov_iters",),
}

# Shared by the docstrings of sqrtm, inv_sqrtm and sqrtm_and_inv_sqrtm (inserted below, so
# that help() of each is complete on its own).
_METHODS_DOC = """
    Methods and their options (docs/meta_layer.md):

    * ``"eigh"`` (default): eigendecomposition, P^{+-1/2} = U diag(lambda^{+-1/2}) U^T, with
      a custom derivative (``jax.custom_jvp``: ``jax.grad``, ``vjp``, ``jvp``, ``jacfwd``
      and ``jacrev`` all work). Options:

      - ``backward`` (str, default ``"exact"``): ``"exact"``, the closed-form
        Daleckii-Krein rule, exact and finite for repeated eigenvalues; or ``"taylor"``,
        the paper's Eqs. 5-8 with K_ij = 1/(lambda_i - lambda_j) replaced by its Taylor
        series (ref [46]), bounded at ties but biased near them.
      - ``taylor_degree`` (int >= 0, default 100): degree of that series.
      - ``eig_floor`` (float in [0, 1) or None): eigenvalues are clamped at
        ``eig_floor * lambda_max`` before the (inverse) root. None (default) is the machine
        epsilon of the compute dtype (1.19e-7 in float32, 2.2e-16 in float64): eigenvalues
        below eps * lambda_max are rounding noise (docs/conditioning.md), so clamping there
        changes nothing measurable yet keeps rank-deficient inputs (GCP: 49 samples,
        d = 256) finite in value and derivative. The derivative is that of the clamped
        matrix function (exact where nothing is clamped; large but finite for the inverse
        root). 0 disables the clamp (a singular input then has an infinite inverse root).

    * ``"eigh_autodiff"``: the same forward, plain autodiff through ``jnp.linalg.eigh``;
      the failing baseline (NaN derivatives at repeated eigenvalues). Options:
      ``eig_floor`` as above.
    * ``"newton_schulz"``: coupled Newton-Schulz iteration (iSQRT-COV), autodiff
      derivative. Options: ``num_iters`` (int >= 1, default 5).
    * ``"pade"``: MPA-Lya, [5/5] Pade forward and a Lyapunov-equation derivative
      (``jax.custom_jvp``, forward and reverse mode). Options: ``lyapunov_iters``
      (int >= 1, default 8), Newton-Schulz steps of the Lyapunov solve.

    Accuracy of the approximate solvers (max-entry relative error vs eigh, float64, d = 8,
    eigenvalues geometric in [1/kappa, 1], measured): Pade sqrt / inverse sqrt 6e-6 / 9e-6
    at kappa = 2, 3e-3 / 1.5e-2 at kappa = 20, 9e-3 / 6e-2 at kappa = 50, 9e-2 / 0.63 at
    kappa = 1e3; Newton-Schulz (5 iterations) 2e-3 / 3e-3, 3e-2 / 0.12, 4e-2 / 0.23,
    5e-2 / 0.77.

    Values (decided under jit, per matrix of the batch; value and derivative alike):

    * the function is that of the symmetric part (P + P^T) / 2, as
      ``jnp.linalg.eigh(symmetrize_input=True)``: smooth in every direction (finite
      differences, ``check_grads``); it is not scipy's principal square root of a
      non-symmetric matrix;
    * a NaN/Inf entry gives NaN;
    * an eigenvalue below -tol ||P||_F means P is not PSD: NaN (eigh methods read it from
      the eigenvalues, newton_schulz and pade from one Cholesky factorisation of
      P + tol ||P||_F I); eigenvalues between that and 0 are rounding and are clamped;
    * tol = sqrt(eps) of the compute dtype (3.5e-4 in float32, 1.5e-8 in float64);
    * the zero matrix is PSD: its square root is exactly 0, with a NaN derivative (that of
      sqrt at 0 is unbounded); its inverse square root is NaN (P^{-1/2} of P = cI is
      c^{-1/2} I, unbounded as c -> 0; the relative eig_floor has no scale to clamp to,
      so any finite answer would be arbitrary; add eps I, e.g. ``covariance(eps=...)``).

    All methods accept any number of batch dims (an empty batch gives an empty result),
    work under jit, vmap, grad and jvp, compute bfloat16/float16 input in float32 and
    return the input dtype; float32 and float64 are computed in their own precision.

"""

_RAISES_DOC = """ValueError: p is not (..., d, d) with d >= 1, an unknown ``method``, or an option
        value out of range (e.g. ``num_iters=0``, ``eig_floor=1.5``).
      TypeError: p is not a real floating array (int, bool, complex, str...), ``method``
        or an option has the wrong type (``num_iters=2.5``, ``num_iters=True``, a traced
        value), or ``method`` does not take an option."""


def _with_methods_doc(fn: Callable) -> Callable:
    """Insert the shared methods/values and raises sections into ``fn``'s docstring."""
    fn.__doc__ = fn.__doc__.replace("    METHODS_DOC\n", _METHODS_DOC).replace(
        "RAISES_DOC", _RAISES_DOC
    )
    return fn


# ----------------------------------------------------------------------------- validation


def _as_float_array(name: str, a: Any) -> Array:
    """``a`` as a jax array of a real floating dtype, else TypeError naming ``name``."""
    try:
        arr = jnp.asarray(a)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a real floating array; got {name}={a!r:.80} ({type(a).__name__})"
        ) from err
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a real floating array (float16/bfloat16/float32/float64); got "
            f"{name}.dtype={arr.dtype}; cast with .astype(jnp.float32)"
        )
    return arr


def _check_square(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) < 2 or shape[-1] != shape[-2] or shape[-1] < 1:
        raise ValueError(
            f"{name} must be a batch of square matrices with shape (..., d, d), d >= 1; "
            f"got {name}.shape={shape}"
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be a static Python int >= {minimum}; got {name}={value!r} "
            f"({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}")


def _check_real(name: str, value: Any, lo: float, hi: float, hi_open: bool) -> None:
    """A static real number in [lo, hi) (hi_open) or [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a static Python float; got {name}={value!r} "
            f"({type(value).__name__})"
        )
    upper_ok = value < hi if hi_open else value <= hi
    if not (lo <= value and upper_ok):  # also rejects NaN
        interval = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be in {interval}; got {name}={value!r}")


def _check_method(method: Any, valid: tuple[str, ...]) -> None:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {valid}; got method={method!r}")
    if method not in valid:
        raise ValueError(f"unknown method={method!r}; valid methods are {valid}")


def _check_options(method: Any, options: dict[str, Any]) -> None:
    """TypeError/ValueError for a bad method, an option it does not take, or a bad value."""
    _check_method(method, METHODS)
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise TypeError(
            f"method={method!r} does not take option(s) {unknown}; "
            f"it accepts {_OPTIONS[method]}"
        )
    if "backward" in options:
        backward = options["backward"]
        if not isinstance(backward, str):
            raise TypeError(f"backward must be a str; got backward={backward!r}")
        if backward not in _eigh_solver.BACKWARDS:
            raise ValueError(
                f"backward must be one of {_eigh_solver.BACKWARDS}; got backward={backward!r}"
            )
    for name, minimum in (("taylor_degree", 0), ("num_iters", 1), ("lyapunov_iters", 1)):
        if name in options:
            _check_int(name, options[name], minimum)
    if options.get("eig_floor") is not None:
        _check_real("eig_floor", options["eig_floor"], 0.0, 1.0, hi_open=True)


def _compute_dtype(dtype: Any) -> Any:
    """float32/float64 stay; bfloat16/float16 (and smaller) compute in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _symmetric_input(p: Any) -> tuple[Array, Array, Any]:
    """Validated p: (sym(p) in the compute dtype, (...) mask of non-finite matrices, dtype)."""
    p = _as_float_array("p", p)
    _check_square("p", p.shape)
    pc, bad = finite_or_zero(p.astype(_compute_dtype(p.dtype)))
    return sym(pc), bad, p.dtype


# ----------------------------------------------------------------------------- covariance


def covariance(x: Array, *, layout: str | None = None, eps: float = 0.0) -> Array:
    """Sample covariance P = X J X^T + eps I, J = (I - 11^T/N)/N (Eq. 2).

    Computed as the centred second moment (X - mean) (X - mean)^T / N, which equals Eq. 2.

    Args:
      x: features, d channels and N samples per matrix, laid out as ``layout`` says.
      layout: required, no default, because both layouts are common and a wrong guess
        silently gives an (N, N) matrix:

        * ``"features_first"``: x is (..., d, N), the paper's X (channels x samples);
        * ``"features_last"``: x is (..., N, d), Flax/NumPy feature rows (e.g. a
          flattened NHWC feature map (H*W, C)).
      eps: added to the diagonal (e.g. the decorrelated-BN epsilon); a static real >= 0.

    Returns:
      (..., d, d) symmetric PSD covariance in x's dtype for float32/float64 input, and in
      float32 for bfloat16/float16 input: a covariance is a second moment, so it overflows
      float16 (max 65504) for features of magnitude ~256 (an entry of 300^2 = 9e4 became
      inf) and would lose bfloat16's few mantissa bits on every entry; pass it on as it is
      (the square-root functions compute in float32 anyway) or cast it yourself. N = 1
      gives the zero matrix (one sample has no spread) plus eps I. NaN/Inf features give a
      non-finite covariance.

    Raises:
      TypeError: ``layout`` missing or not a str; x not a real floating array; eps not a
        static real number.
      ValueError: unknown ``layout``; x with fewer than 2 dims, d = 0 or N = 0; eps
        negative or not finite.

    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import covariance
      >>> x = jnp.array([[1.0, -1.0], [2.0, -2.0]])  # d = 2 channels, N = 2 samples
      >>> covariance(x, layout="features_first").tolist()
      [[1.0, 2.0], [2.0, 4.0]]
      >>> covariance(x.T, layout="features_last", eps=0.5).tolist()
      [[1.5, 2.0], [2.0, 4.5]]
      >>> covariance(300 * x.astype(jnp.float16), layout="features_first").dtype
      dtype('float32')
    """
    if layout is None:
        raise TypeError(
            "covariance() needs layout=: 'features_first' when x is (..., d, N), d channels "
            "by N samples (the paper's X), or 'features_last' when x is (..., N, d), one "
            "sample per row (Flax features, e.g. a flattened (H*W, C) feature map)"
        )
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a str, one of {LAYOUTS}; got layout={layout!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout={layout!r}; valid layouts are {LAYOUTS}")
    _check_real("eps", eps, 0.0, float("inf"), hi_open=True)
    x = _as_float_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dims for layout={layout!r}; "
                         f"got x.shape={x.shape}")
    xf = x if layout == "features_first" else mT(x)
    d, n = xf.shape[-2:]
    if d == 0 or n == 0:
        raise ValueError(f"x needs d >= 1 channels and N >= 1 samples; got x.shape={x.shape} "
                         f"with layout={layout!r} (d={d}, N={n})")
    xc = xf.astype(_compute_dtype(x.dtype))
    xc = xc - jnp.mean(xc, axis=-1, keepdims=True)
    p = jnp.matmul(xc, mT(xc), precision=HIGHEST) / n
    if eps:
        p = p + eps * jnp.eye(d, dtype=p.dtype)
    return p  # the compute dtype: float32 for bfloat16/float16 (see Returns)


# ----------------------------------------------------------------------- matrix functions


def _matrix_functions(
    p: Any, method: str, options: dict[str, Any], want_sqrt: bool, want_inv: bool
) -> tuple[Array | None, Array | None]:
    _check_options(method, options)
    ps, bad, dtype = _symmetric_input(p)
    q, s = _SOLVERS[method](ps, want_sqrt=want_sqrt, want_inv=want_inv, **options)
    zero = frobenius(ps) == 0
    if q is not None:
        q = nan_where(bad, nan_tangent_where(zero, q)).astype(dtype)
    if s is not None:
        s = nan_where(bad | zero, s).astype(dtype)
    return q, s


@_with_methods_doc
def sqrtm(p: Array, *, method: str = "eigh", **options: Any) -> Array:
    """Matrix square root Q = P^{1/2} of symmetric PSD matrices (Eqs. 3-4).

    Args:
      p: (..., d, d) symmetric PSD matrices, a real floating array.
      method: one of :data:`METHODS` (below).
      **options: options of that method (below).

    Returns:
      (..., d, d) square root in p's dtype.

    Raises:
      RAISES_DOC
    METHODS_DOC
    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import sqrtm
      >>> sqrtm(jnp.diag(jnp.array([4.0, 9.0]))).round(4).tolist()
      [[2.0, 0.0], [0.0, 3.0]]
      >>> sqrtm(jnp.zeros((2, 2))).tolist()  # the zero matrix is PSD
      [[0.0, 0.0], [0.0, 0.0]]
      >>> bool(jnp.isnan(sqrtm(-jnp.eye(2))).all())  # not PSD
      True
      >>> _, dq = jax.jvp(sqrtm, (jnp.eye(2),), (jnp.eye(2),))  # forward mode
      >>> dq.tolist()
      [[0.5, 0.0], [0.0, 0.5]]
    """
    return _matrix_functions(p, method, options, True, False)[0]


@_with_methods_doc
def inv_sqrtm(p: Array, *, method: str = "eigh", **options: Any) -> Array:
    """Inverse matrix square root S = P^{-1/2} (Eq. 4), e.g. for ZCA whitening.

    Args:
      p: (..., d, d) symmetric PSD matrices, a real floating array.
      method: one of :data:`METHODS` (below).
      **options: options of that method (below).

    Returns:
      (..., d, d) inverse square root in p's dtype; NaN for the zero matrix.

    Raises:
      RAISES_DOC
    METHODS_DOC
    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import inv_sqrtm
      >>> inv_sqrtm(jnp.diag(jnp.array([4.0, 16.0]))).round(4).tolist()
      [[0.5, 0.0], [0.0, 0.25]]
      >>> inv_sqrtm(jnp.diag(jnp.array([1.0, 0.0])), eig_floor=0.01).round(4).tolist()
      [[1.0, 0.0], [0.0, 10.0]]
    """
    return _matrix_functions(p, method, options, False, True)[1]


@_with_methods_doc
def sqrtm_and_inv_sqrtm(
    p: Array, *, method: str = "eigh", **options: Any
) -> tuple[Array, Array]:
    """Both P^{1/2} and P^{-1/2} from one decomposition (Eq. 4; WCT needs both).

    The custom derivative rules combine both outputs in a single pass.

    Args:
      p: (..., d, d) symmetric PSD matrices, a real floating array.
      method: one of :data:`METHODS` (below).
      **options: options of that method (below).

    Returns:
      (q, s): square root and inverse square root, both in p's dtype.

    Raises:
      RAISES_DOC
    METHODS_DOC
    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import sqrtm_and_inv_sqrtm
      >>> q, s = sqrtm_and_inv_sqrtm(jnp.diag(jnp.array([4.0, 9.0])))
      >>> (q @ s).round(4).tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    q, s = _matrix_functions(p, method, options, True, True)
    return q, s


# ------------------------------------------------------------------ condition numbers


def condition_number(p: Array) -> Array:
    """kappa(P) = lambda_max / lambda_min (Eq. 1) of symmetric PSD matrices, in jax.

    In float32 values above ~1e6 are rounding noise; use :func:`condition_number_f64`
    for monitoring.

    Args:
      p: (..., d, d) symmetric PSD matrices, a real floating array.

    Returns:
      (...,) condition numbers in the compute dtype (float32 for bfloat16/float16 input).
      Decided by the values, per matrix: inf where lambda_min <= 0 (singular, including
      the zero matrix and eigenvalues that are negative at rounding level); NaN where P has
      a NaN/Inf entry or is not PSD (lambda_min < -tol ||P||_F, tol = sqrt(eps) of the
      compute dtype). P is symmetrised, (P + P^T) / 2.

    Raises:
      ValueError: p is not (..., d, d) with d >= 1.
      TypeError: p is not a real floating array.

    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import condition_number
      >>> float(condition_number(jnp.diag(jnp.array([1.0, 100.0]))))
      100.0
      >>> singular, indefinite = jnp.diag(jnp.array([1.0, 0.0])), jnp.diag(jnp.array([1.0, -1.0]))
      >>> condition_number(jnp.stack([singular, indefinite])).tolist()
      [inf, nan]
    """
    ps, bad, _ = _symmetric_input(p)
    lam = map_matrices(lambda a: jnp.linalg.eigvalsh(a, symmetrize_input=False), ps)
    lo, hi = lam[..., 0], lam[..., -1]
    not_psd = lo < -psd_tolerance(ps.dtype) * frobenius(ps)
    kappa = jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1), jnp.inf)
    return jnp.where(bad | not_psd, jnp.nan, kappa)


def _host_float64(name: str, p: Any) -> tuple[np.ndarray, float]:
    """p as a float64 NumPy array and the PSD tolerance of its dtype."""
    if isinstance(p, jax.core.Tracer):
        raise TypeError(f"{name} is traced (under jit/vmap/grad): the float64 monitors run on "
                        "the host on concrete values; inside jit use condition_number")
    if isinstance(p, (str, bytes)):
        raise TypeError(f"{name} must be a real numeric array; got {name}={p!r:.80}")
    try:
        arr = np.asarray(p)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real numeric array; got {type(p).__name__}") from err
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating)
                                 or np.issubdtype(arr.dtype, np.integer)
                                 or arr.dtype == jnp.bfloat16):
        raise TypeError(f"{name} must be a real numeric (float or int) array; "
                        f"got {name}.dtype={arr.dtype}")
    _check_square(name, arr.shape)
    exact = np.issubdtype(arr.dtype, np.integer)
    tol = psd_tolerance(np.float64 if exact else _compute_dtype(arr.dtype))
    return arr.astype(np.float64), tol


def _eigvalsh_checked(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 eigenvalues of sym(a), NaN rows where a has a NaN/Inf entry, and ||sym(a)||_F.

    LAPACK returns finite garbage for a matrix with a NaN, so those are not decomposed.
    """
    finite = np.isfinite(a).all(axis=(-2, -1))
    safe = np.where(finite[..., None, None], a, 0.0)
    safe = (safe + np.swapaxes(safe, -1, -2)) / 2
    lam = np.linalg.eigvalsh(safe)
    return np.where((~finite)[..., None], np.nan, lam), np.linalg.norm(safe, axis=(-2, -1))


def eigvalsh_f64(p: Any) -> np.ndarray:
    """Host-side float64 eigenvalues (ascending) of a (batch of) symmetric matrices.

    Args:
      p: (..., d, d) real array (jax or NumPy; float of any precision, or int); converted
        to float64 and symmetrised there.

    Returns:
      (..., d) float64 NumPy array: the eigenvalues of (P + P^T) / 2. NaN for a matrix with
      a NaN/Inf entry (LAPACK would return finite garbage for it).

    Raises:
      ValueError: p is not (..., d, d) with d >= 1.
      TypeError: p is not a real numeric array (bool, complex, str, object).

    Example:
      >>> import numpy as np
      >>> from svdcond_jax import eigvalsh_f64
      >>> eigvalsh_f64(np.diag([3.0, 1.0])).tolist()
      [1.0, 3.0]
      >>> eigvalsh_f64(np.array([[1.0, np.nan], [np.nan, 1.0]])).tolist()
      [nan, nan]
    """
    return _eigvalsh_checked(_host_float64("p", p)[0])[0]


def condition_number_f64(p: Any, *, eps: float = 0.0) -> np.ndarray | float:
    """Host-side float64 condition number kappa(P + eps I) (Eq. 1), the conditioning monitor.

    Why float64: the eigenvalues of a float32 matrix carry absolute errors near
    1e-7 * lambda_max (float32 machine epsilon times the norm), so lambda_min cannot be
    resolved below that level and any kappa above ~1e6 read in float32 is noise. The paper's
    curves reach 1e12-1e16, so the matrix is converted to float64 and decomposed with NumPy
    (error ~2e-16 * lambda_max). Note a covariance *computed* in float32 already carries
    float32 rounding; compute it in float64 too for faithful readings
    (docs/conditioning.md).

    Args:
      p: (..., d, d) symmetric PSD matrices (jax or NumPy, float or int).
      eps: added to the diagonal in float64 before decomposing (e.g. a layer's eps*I); a
        static real >= 0.

    Returns:
      A Python float for a single matrix, else a (...,) float64 array: inf where
      lambda_min <= 0 (singular, the zero matrix included); NaN where P has a NaN/Inf
      entry or P + eps I is not PSD (lambda_min < -tol ||P + eps I||_F, tol = sqrt(eps) of
      p's dtype, of float64 for ints). P is symmetrised, (P + P^T) / 2.

    Raises:
      ValueError: p is not (..., d, d) with d >= 1; eps negative or not finite.
      TypeError: p is not a real numeric array; eps not a real number.

    Example:
      >>> import numpy as np
      >>> from svdcond_jax import condition_number_f64
      >>> condition_number_f64(np.diag([1e-12, 1.0]))
      1000000000000.0
      >>> condition_number_f64(np.diag([-1.0, 1.0]))
      nan
    """
    _check_real("eps", eps, 0.0, float("inf"), hi_open=True)
    a, tol = _host_float64("p", p)
    if eps:
        a = a + eps * np.eye(a.shape[-1])
    lam, norm = _eigvalsh_checked(a)
    lo, hi = lam[..., 0], lam[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)
    kappa = np.where(np.isnan(lo) | (lo < -tol * norm), np.nan, kappa)
    return float(kappa) if kappa.ndim == 0 else kappa
