"""Float64 conditioning telemetry of the Pre-SVD output (Eqs. 1-2; docs/conditioning.md).

The covariance the meta-layer decomposes is computed on the host in float64 from the Pre-SVD
layer's output features, and its eigenvalues come from ``meta_layer.eigvalsh_f64`` (float32
cannot resolve kappa above ~1e6). Reported per record:

- ``kappa_raw``: lambda_max / lambda_min of the covariance (Eq. 1). When the covariance is
  singular (numerical rank < dim, or kappa at or above :data:`KAPPA_CAP` = 1 / float64 eps
  ~ 4.5e15) ``singular`` is True and ``kappa_raw`` is None (JSON null): such a number is not
  a condition number; ``rank`` and ``dim`` say how singular. A 3x3 conv from 3 channels has
  rank <= 27 (from one grey channel: <= 9), so its raw covariance is singular for every
  method when it has more output channels.
- ``kappa_eps``: the same for P + eps*I, eps being the layer's own (DBN: ``dbn_eps``;
  GCP: 0 -> equal to kappa_raw, None when singular). The matrix the DBN decomposes.
- ``kappa_nonzero``: lambda_max over the smallest eigenvalue above the rank threshold, the
  condition number on the covariance's range: finite for singular covariances too, so a
  singular run still has a meaningful curve.
- ``lambda_max``, ``lambda_min`` (of the raw covariance), ``rank`` (numerical rank:
  eigenvalues > lambda_max * dim * float64 eps, NumPy's matrix_rank tolerance) and ``dim``.

Decorrelated BN (task "dbn"): X is (C, B*H*W), channels centred over all positions of the
batch (what the DBN whitens). GCP (task "gcp"): one covariance per image, (C, H*W); the
record holds the median over the images of each quantity (``singular`` = any image is), plus
``kappa_eps_max`` (the worst image). The GCP features are sown after the head's BN + ReLU:
exactly the matrix the meta-layer decomposes.

Every record has ``finite``: False when the features hold NaN/Inf (a non-finite batch, the
step the train step skipped); such a record keeps ``dim`` and has None (JSON null) for the
eigenvalue statistics, instead of letting the float64 eigensolver raise ``LinAlgError`` and
kill the run.

Example:
    >>> import numpy as np
    >>> from svdcond_jax.training.monitor import conditioning_stats
    >>> x = np.random.default_rng(0).normal(size=(4, 8, 8, 5))
    >>> stats = conditioning_stats(x, eps=0.0)
    >>> stats["rank"], stats["dim"], stats["singular"], stats["finite"]
    (5, 5, False, True)
    >>> x[0, 0, 0, 0] = np.nan
    >>> bad = conditioning_stats(x, eps=0.0)
    >>> bad["finite"], bad["kappa_eps"], bad["dim"]
    (False, None, 5)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from svdcond_jax.meta_layer import eigvalsh_f64

EPS64 = float(np.finfo(np.float64).eps)
KAPPA_CAP = 1.0 / EPS64  # kappa at or above this is "singular in float64"


def covariance_f64(x: np.ndarray) -> np.ndarray:
    """Float64 covariance P = X J X^T (Eq. 2) of (..., d, N) samples, on the host."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=-1, keepdims=True)
    return xc @ np.swapaxes(xc, -1, -2) / x.shape[-1]


def _kappa(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)
    return np.minimum(k, KAPPA_CAP)


def eigen_stats(p: np.ndarray, *, eps: float = 0.0, relative_eps: bool = False
                ) -> dict[str, np.ndarray]:
    """kappa raw / with eps*I, extreme eigenvalues and numerical rank of (..., d, d) matrices.

    Args:
        p: symmetric PSD matrices.
        eps: the layer's eps*I (added in float64; eigenvalues shift by exactly eps).
        relative_eps: the layer adds eps * trace(p) / d instead (``relative_epsilon``).

    Returns:
        Arrays of shape (...,): kappa_raw, kappa_eps, kappa_nonzero (lambda_max over the
        smallest eigenvalue above the rank threshold), lambda_max, lambda_min, rank,
        singular. Kappas are capped at :data:`KAPPA_CAP` here (``conditioning_stats``
        turns capped values into None).
    """
    lam = eigvalsh_f64(p)
    dim = lam.shape[-1]
    lo, hi = lam[..., 0], lam[..., -1]
    if relative_eps:
        eps = eps * np.trace(np.asarray(p, np.float64), axis1=-2, axis2=-1) / dim
    tol = np.maximum(hi, 0.0)[..., None] * dim * EPS64
    above = lam > tol
    rank = np.sum(above, axis=-1)
    kappa_raw = _kappa(lo, hi)
    lo_nonzero = np.min(np.where(above, lam, np.inf), axis=-1)  # inf when rank is 0
    return {"kappa_raw": kappa_raw, "kappa_eps": _kappa(lo + eps, hi + eps),
            "kappa_nonzero": _kappa(np.where(np.isfinite(lo_nonzero), lo_nonzero, 0.0), hi),
            "lambda_max": hi, "lambda_min": lo, "rank": rank,
            "singular": (kappa_raw >= KAPPA_CAP) | (rank < dim)}


def conditioning_stats(features: Any, *, eps: float, per_image: bool = False,
                       relative_eps: bool = False) -> dict[str, Any]:
    """Conditioning record of the Pre-SVD output features (JSON-ready Python scalars).

    Args:
        features: NHWC features with any leading axes (e.g. (devices, B, H, W, C)).
        eps: eps*I of the layer (``pre_svd_eps(model)``).
        relative_eps: the layer adds eps * trace(P) / d (``dbn_eps_relative``).
        per_image: GCP: one covariance per image, median over images; else one covariance
            over all batch positions (decorrelated BN).

    Returns:
        dict with kappa_raw, kappa_eps, kappa_nonzero, lambda_max, lambda_min, rank, dim,
        singular, finite (and kappa_eps_max when per_image); a kappa of a singular matrix
        is None (never the 4.5e15 cap); with non-finite features finite is False and the
        other statistics but dim are None.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim < 4:
        raise ValueError(f"features must be NHWC with optional leading axes; got {x.shape=}")
    c = x.shape[-1]
    if not np.all(np.isfinite(x)):
        keys = ["kappa_raw", "kappa_eps", "kappa_nonzero", "lambda_max", "lambda_min", "rank",
                "singular"]
        if per_image:
            keys.append("kappa_eps_max")
        return {**dict.fromkeys(keys), "dim": int(c), "finite": False}
    x = x.reshape(-1, x.shape[-3] * x.shape[-2], c)  # (B, HW, C)
    if per_image:
        stats = eigen_stats(covariance_f64(np.swapaxes(x, -1, -2)), eps=eps,
                            relative_eps=relative_eps)
        out = {k: float(np.median(v)) for k, v in stats.items() if k != "singular"}
        out["rank"] = int(np.median(stats["rank"]))
        out["singular"] = bool(np.any(stats["singular"]))
        out["kappa_eps_max"] = float(np.max(stats["kappa_eps"]))
    else:
        stats = eigen_stats(covariance_f64(x.reshape(-1, c).T), eps=eps,
                            relative_eps=relative_eps)
        out = {k: float(v) for k, v in stats.items() if k not in ("singular", "rank")}
        out["rank"], out["singular"] = int(stats["rank"]), bool(stats["singular"])
    for key in ("kappa_raw", "kappa_eps", "kappa_nonzero", "kappa_eps_max"):
        if key in out and out[key] >= KAPPA_CAP:
            out[key] = None  # "singular in float64" is not a number: None, with rank and dim
    if out["singular"] and not per_image:
        out["kappa_raw"] = None
    out["dim"] = int(c)
    out["finite"] = True
    return out


def format_kappa(record: dict[str, Any]) -> str:
    """Short progress-bar text of a conditioning record.

    kappa_eps ("sing" if singular), then the raw kappa, or "sing(r<rank>/<dim>)" followed
    by "nz<kappa on the non-zero spectrum>".
    """
    if record.get("finite") is False:
        return "non-finite"
    raw = (f"sing(r{record['rank']}/{record['dim']})" if record["singular"]
           or record.get("kappa_raw") is None else f"{record['kappa_raw']:.1e}")
    eps, nonzero = record.get("kappa_eps"), record.get("kappa_nonzero")
    text = f"{'sing' if eps is None else f'{eps:.1e}'}|{raw}"
    if record["singular"] and nonzero is not None:
        text += f"|nz{nonzero:.1e}"
    return text
