"""The SVD meta-layer: covariance (Eq. 2), square root and inverse square root (Eqs. 3-8).

Public API: :func:`covariance`, :func:`sqrtm`, :func:`inv_sqrtm`,
:func:`sqrtm_and_inv_sqrtm`, :data:`METHODS`, :func:`condition_number` (Eq. 1, in jax) and
the host-side float64 monitors :func:`eigvalsh_f64`, :func:`condition_number_f64`.

Methods (docs/meta_layer.md):

* ``"eigh"``: eigendecomposition, ``jax.custom_vjp`` backward. Options: ``backward``
  ("exact" closed-form Daleckii-Krein rule, default; or "taylor", the paper's Eqs. 5-8 with
  the Taylor K of ref [46]), ``taylor_degree`` (100), ``eig_floor``.
* ``"eigh_autodiff"``: same forward, plain autodiff through ``jnp.linalg.eigh`` (the failing
  baseline: NaN gradients for repeated eigenvalues). Options: ``eig_floor``.
* ``"newton_schulz"``: iSQRT-COV, autodiff backward. Options: ``num_iters`` (5).
* ``"pade"``: MPA-Lya, Lyapunov backward. Options: ``lyapunov_iters`` (8).

``eig_floor`` is relative: eigenvalues are clamped at ``eig_floor * lambda_max``. The default
(None) is the machine epsilon of the compute dtype (1.19e-7 in float32, 2.2e-16 in float64):
eigenvalues below eps * lambda_max are rounding noise (docs/conditioning.md), so clamping
there changes nothing measurable yet keeps rank-deficient inputs (GCP: 49 samples, d = 256)
finite in value and gradient. The custom backward rules are evaluated at the clamped
spectrum (the paper's Eq. 6 with the clamped Lambda, as the reference code does): where no
eigenvalue is clamped they are exact; where some are, they give the gradient of the matrix
function at P' = U max(Lambda, floor) U^T (large but finite for the inverse root), while
``eigh_autodiff`` differentiates through the clamp (zero slope below the floor).

Accuracy of the approximate solvers (max-entry relative error vs eigh, float64, d = 8,
eigenvalues geometric in [1/kappa, 1], measured): [5/5] Pade sqrt / inverse sqrt
6e-6 / 9e-6 at kappa = 2, 3e-3 / 1.5e-2 at kappa = 20, 9e-3 / 6e-2 at kappa = 50,
9e-2 / 0.63 at kappa = 1e3; Newton-Schulz with 5 iterations 2e-3 / 3e-3, 3e-2 / 0.12,
4e-2 / 0.23, 5e-2 / 0.77. The inverse roots amplify the error at the small end of the
spectrum; both solvers need larger kappa-dependent effort (docs/meta_layer.md).

All functions symmetrise their input, accept any number of batch dims, work under jit, vmap
and grad, compute bfloat16/float16 input in float32 and return the input dtype. The custom
backward rules support reverse mode only (``jax.grad``/``jax.vjp``), not ``jax.jvp``.
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
from svdcond_jax.solvers._common import HIGHEST, mT, sym

Array = jax.Array

METHODS: tuple[str, ...] = ("eigh", "eigh_autodiff", "newton_schulz", "pade")

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


# ----------------------------------------------------------------------------- validation


def _check_square(name: str, a: Any) -> None:
    shape = tuple(np.shape(a))
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(
            f"{name} must be a batch of square matrices with shape (..., d, d); "
            f"got {name}.shape={shape}"
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}")


def _check_options(method: str, options: dict[str, Any]) -> None:
    """Raise ValueError for an unknown method, an option it does not take, or a bad value."""
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; valid methods are {METHODS}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(
            f"method={method!r} does not take option(s) {unknown}; "
            f"it accepts {_OPTIONS[method]}"
        )
    if "backward" in options and options["backward"] not in _eigh_solver.BACKWARDS:
        raise ValueError(
            f"backward must be one of {_eigh_solver.BACKWARDS}; got {options['backward']!r}"
        )
    for name, minimum in (("taylor_degree", 0), ("num_iters", 1), ("lyapunov_iters", 1)):
        if name in options:
            _check_int(name, options[name], minimum)
    floor = options.get("eig_floor")
    if floor is not None and not (isinstance(floor, numbers.Real) and 0 <= floor < 1):
        raise ValueError(f"eig_floor must be None or a float in [0, 1); got eig_floor={floor!r}")


def _compute_dtype(name: str, a: Array) -> jnp.dtype:
    """float32/float64 stay; bfloat16/float16 compute in float32; anything else raises."""
    dtype = jnp.result_type(a)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a real floating array; got {name}.dtype={dtype}")
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- covariance


def covariance(x: Array, *, eps: float = 0.0) -> Array:
    """Sample covariance P = X J X^T + eps I, J = (I - 11^T/N)/N (Eq. 2).

    Computed as the centred second moment (X - mean) (X - mean)^T / N, which equals Eq. 2.

    Args:
      x: features (..., d, N): d channels, N samples per matrix.
      eps: added to the diagonal (e.g. the decorrelated-BN epsilon).

    Returns:
      (..., d, d) symmetric PSD covariance in x's dtype (bfloat16/float16 computed in float32).

    Raises:
      ValueError: if x has fewer than 2 dimensions.

    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import covariance
      >>> covariance(jnp.array([[1.0, -1.0], [2.0, -2.0]])).tolist()
      [[1.0, 2.0], [2.0, 4.0]]
    """
    if np.ndim(x) < 2:
        raise ValueError(f"x must have shape (..., d, N); got x.shape={tuple(np.shape(x))}")
    x = jnp.asarray(x)
    xc = x.astype(_compute_dtype("x", x))
    xc = xc - jnp.mean(xc, axis=-1, keepdims=True)
    p = jnp.matmul(xc, mT(xc), precision=HIGHEST) / x.shape[-1]
    if eps:
        p = p + eps * jnp.eye(x.shape[-2], dtype=p.dtype)
    return p.astype(x.dtype)


# ----------------------------------------------------------------------- matrix functions


def _matrix_functions(
    p: Array, method: str, options: dict[str, Any], want_sqrt: bool, want_inv: bool
) -> tuple[Array | None, Array | None]:
    _check_square("p", p)
    _check_options(method, options)
    p = jnp.asarray(p)
    dtype = p.dtype
    pc = sym(p.astype(_compute_dtype("p", p)))
    q, s = _SOLVERS[method](pc, want_sqrt=want_sqrt, want_inv=want_inv, **options)
    cast = lambda a: None if a is None else a.astype(dtype)
    return cast(q), cast(s)


def sqrtm(p: Array, *, method: str = "eigh", **options: Any) -> Array:
    """Matrix square root Q = P^{1/2} of symmetric PSD matrices (Eqs. 3-4).

    Args:
      p: (..., d, d) symmetric PSD (symmetrised internally).
      method: one of :data:`METHODS`.
      **options: method-specific options (see the module docstring); an option the method
        does not take raises ValueError.

    Returns:
      (..., d, d) square root in p's dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import sqrtm
      >>> sqrtm(jnp.diag(jnp.array([4.0, 9.0]))).round(4).tolist()
      [[2.0, 0.0], [0.0, 3.0]]
    """
    return _matrix_functions(p, method, options, True, False)[0]


def inv_sqrtm(p: Array, *, method: str = "eigh", **options: Any) -> Array:
    """Inverse matrix square root S = P^{-1/2} (Eq. 4), e.g. for ZCA whitening.

    Args:
      p: (..., d, d) symmetric PSD (symmetrised internally).
      method: one of :data:`METHODS`.
      **options: method-specific options (see the module docstring).

    Returns:
      (..., d, d) inverse square root in p's dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import inv_sqrtm
      >>> inv_sqrtm(jnp.diag(jnp.array([4.0, 16.0]))).round(4).tolist()
      [[0.5, 0.0], [0.0, 0.25]]
    """
    return _matrix_functions(p, method, options, False, True)[1]


def sqrtm_and_inv_sqrtm(
    p: Array, *, method: str = "eigh", **options: Any
) -> tuple[Array, Array]:
    """Both P^{1/2} and P^{-1/2} from one decomposition (Eq. 4; WCT needs both).

    The custom backward rules combine both cotangents in a single pass.

    Args:
      p: (..., d, d) symmetric PSD (symmetrised internally).
      method: one of :data:`METHODS`.
      **options: method-specific options (see the module docstring).

    Returns:
      (q, s): square root and inverse square root, both in p's dtype.

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
    """kappa(P) = lambda_max / lambda_min (Eq. 1), in jax; inf where lambda_min <= 0.

    In float32 values above ~1e6 are rounding noise; use :func:`condition_number_f64`
    for monitoring.

    Args:
      p: (..., d, d) symmetric matrices.

    Returns:
      (...,) condition numbers in the compute dtype (float32 for low-precision input).

    Example:
      >>> import jax.numpy as jnp
      >>> from svdcond_jax import condition_number
      >>> float(condition_number(jnp.diag(jnp.array([1.0, 100.0]))))
      100.0
    """
    _check_square("p", p)
    p = jnp.asarray(p)
    lam = jnp.linalg.eigvalsh(sym(p.astype(_compute_dtype("p", p))))
    lo, hi = lam[..., 0], lam[..., -1]
    return jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1), jnp.inf)


def eigvalsh_f64(p: Any) -> np.ndarray:
    """Host-side float64 eigenvalues (ascending) of a (batch of) symmetric matrices.

    Args:
      p: (..., d, d) array (jax or NumPy, any float dtype); symmetrised in float64.

    Returns:
      (..., d) float64 NumPy array.

    Example:
      >>> import numpy as np
      >>> from svdcond_jax import eigvalsh_f64
      >>> eigvalsh_f64(np.diag([3.0, 1.0])).tolist()
      [1.0, 3.0]
    """
    _check_square("p", p)
    a = np.asarray(p).astype(np.float64)
    return np.linalg.eigvalsh((a + np.swapaxes(a, -1, -2)) / 2)


def condition_number_f64(p: Any, *, eps: float = 0.0) -> np.ndarray | float:
    """Host-side float64 condition number kappa(P + eps I) (Eq. 1), the conditioning monitor.

    Why float64: the eigenvalues of a float32 matrix carry absolute errors near
    1e-7 * lambda_max (float32 machine epsilon times the norm), so lambda_min cannot be
    resolved below that level and any kappa above ~1e6 read in float32 is noise. The paper's
    curves reach 1e12-1e16, so the matrix is converted to float64 and decomposed with NumPy
    (error ~2e-16 * lambda_max). Note a covariance *computed* in float32 already carries
    float32 rounding; compute it in float64 too for faithful readings
    (docs/conditioning.md). Returns inf where lambda_min <= 0.

    Args:
      p: (..., d, d) symmetric PSD matrices (jax or NumPy).
      eps: added to the diagonal in float64 before decomposing (e.g. a layer's eps*I).

    Returns:
      A Python float for a single matrix, else a (...,) float64 array.

    Example:
      >>> import numpy as np
      >>> from svdcond_jax import condition_number_f64
      >>> condition_number_f64(np.diag([1e-12, 1.0]))
      1000000000000.0
    """
    _check_square("p", p)
    a = np.asarray(p).astype(np.float64)
    if eps:
        a = a + eps * np.eye(a.shape[-1])
    lam = eigvalsh_f64(a)
    lo, hi = lam[..., 0], lam[..., -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)
    return float(kappa) if kappa.ndim == 0 else kappa
