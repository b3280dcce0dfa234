"""Paired comparisons over seeds: exact sign-flip tests and intervals for a mean difference.

In a sweep every method of a seed starts from the same initial parameters (where the
parameter trees coincide) and sees the same batches in the same order (the input pipeline
is a function of the seed), so the per-seed difference ``d_s = error(method, s) -
error(svd, s)`` removes what the seed alone decides. We compare methods by the mean of
``d_s`` with a 95% interval from the exact sign-flip (randomisation) test: under "no
difference" each ``d_s`` is as likely positive as negative, so all ``2**n`` sign patterns
of ``d`` are equally likely. The interval is every shift ``delta`` that the two-sided test
of ``mean(d - delta) = 0`` does not reject at level ``1 - confidence``; a method is
*separable* from the reference when its interval excludes 0. The test makes no normality
assumption, is deterministic (no resampling seed, the same verdict on every machine for
the same data) and exact for ``n <= 16`` (above that, 2**16 sign patterns drawn with a
fixed seed). With ``n`` seeds the smallest attainable two-sided p-value is ``2 / 2**n``,
so a 95% interval can exclude 0 only from ``n = 6`` seeds on; with fewer,
:func:`sign_flip_interval` returns None.

Example:
    >>> d = [0.4, 0.7, 0.2, 0.5, 0.9, 0.3, 0.6]  # per-seed differences (points)
    >>> round(sign_flip_pvalue(d), 4)               # every d > 0: only 2 of 128 patterns
    0.0156
    >>> lo, hi = sign_flip_interval(d)
    >>> bool(lo > 0), round(lo, 3), round(hi, 3)
    (True, 0.3, 0.75)
    >>> sign_flip_interval(d[:5]) is None            # 5 seeds cannot reach p < 0.05
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

EXACT_MAX_N = 16  # 2**16 sign patterns; beyond, that many random patterns (fixed seed)
_TIE = 1e-12  # relative tolerance for "as extreme as observed" (ties count as extreme)


def _signs(n: int) -> np.ndarray:
    """(P, n) sign patterns: all 2**n for n <= EXACT_MAX_N, else 2**16 drawn with seed 0
    (the identity pattern first)."""
    if n <= EXACT_MAX_N:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    rng = np.random.default_rng(0)
    draws = rng.choice((1.0, -1.0), size=(2**EXACT_MAX_N - 1, n))
    return np.vstack([np.ones((1, n)), draws])


def sign_flip_pvalue(d: Sequence[float], delta: float = 0.0) -> float:
    """Two-sided p-value of the sign-flip test of ``mean(d) = delta``.

    Args:
        d: per-seed paired differences.
        delta: the hypothesised mean difference.

    Returns:
        The share of sign patterns whose |mean| is at least the observed |mean(d - delta)|.

    Raises:
        ValueError: for an empty ``d`` or a non-finite value.
    """
    x = np.asarray(d, np.float64) - delta
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"d={list(d)!r}: need one or more finite differences")
    means = np.abs(_signs(x.size) @ x) / x.size
    observed = abs(x.mean())
    return float(np.mean(means >= observed * (1 - _TIE) - _TIE))


def sign_flip_interval(d: Sequence[float], confidence: float = 0.95
                       ) -> tuple[float, float] | None:
    """The exact sign-flip confidence interval of the mean paired difference.

    The set of ``delta`` with ``sign_flip_pvalue(d, delta) > 1 - confidence``, found by
    bisection on each side of ``mean(d)`` (to 1e-9 of the data's range).

    Args:
        d: per-seed paired differences.
        confidence: e.g. 0.95.

    Returns:
        (low, high), or None when ``n`` seeds cannot reject at this level at all
        (``2 / 2**n >= 1 - confidence``: fewer than 6 seeds at 95%).

    Raises:
        ValueError: for an empty ``d``, a non-finite value, or a confidence outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: must be in (0, 1)")
    x = np.asarray(d, np.float64)
    alpha = 1.0 - confidence
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"d={list(d)!r}: need one or more finite differences")
    if x.size <= EXACT_MAX_N and 2.0 / 2**x.size > alpha:
        return None
    center = float(x.mean())
    span = float(np.ptp(x)) + float(np.abs(x).max()) + 1e-12
    tol = 1e-9 * span

    def accepted(delta: float) -> bool:
        return sign_flip_pvalue(x, delta) > alpha

    def edge(direction: float) -> float:
        inside, outside = center, center + direction * 2 * span
        while accepted(outside):  # defensive: widen until rejected
            outside = center + 2 * (outside - center)
        while abs(outside - inside) > tol:
            mid = 0.5 * (inside + outside)
            inside, outside = (mid, outside) if accepted(mid) else (inside, mid)
        return inside

    return edge(-1.0), edge(1.0)
