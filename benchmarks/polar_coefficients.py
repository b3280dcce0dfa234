"""Derives the coefficients of ``polar_factor(m, method="polar_express")`` and checks them.

    python -m benchmarks.polar_coefficients

The fast polar factor runs five odd quintic steps ``X <- X (a I + b A + c A^2)``,
``A = X^T X``, on ``X0 = m / s`` (``s`` >= sigma_max(m), see svdcond_jax/orthogonal.py).
A step maps each singular value ``x`` of ``X`` to ``p(x) = a x + b x^3 + c x^5``, so five
steps map it to the composition ``f = p5 o ... o p1``. The coefficients follow the greedy
minimax construction of Polar Express (Amsel et al., 2025): step ``t`` is the odd quintic
closest to 1 in the max norm on the interval ``[lo_t, hi_t]`` where the singular values
lie, and that interval becomes ``[1 - E_t, 1 + E_t]`` (``E_t`` its minimax error) for the
next step; the greedy choice is optimal for the composition. Each minimax problem is a
small linear program (3 coefficients + the error bound) on a dense grid, solved with
SciPy's HiGHS. Our choices, not the paper's published list:

* the interval ``[LOW, 1 + CUSHION]`` = ``[3e-3, 1.01]``: five steps (the cost of
  ``optax.contrib.muon``'s Newton-Schulz) take every singular value in it to within
  ``7.6e-3`` of 1, below the 1e-2 target (a lower end of 2.5e-3 would give 1.4e-2);
* a 1% cushion: each interval is widened by the factor 1.01 at both ends before the next
  step is fitted, so that values a little outside it (the sigma_max bound rounded, bfloat16
  operands) are still mapped into the next interval instead of blowing up (with a 0.1%
  cushion, one bfloat16 run on a 4608 x 512 Gaussian matrix ended with singular values
  off by 0.17);
* the cut: ``f`` is increasing on ``[0, LOW]`` and ``f(x) <= 1e-2`` for
  ``x <= 1.76e-5`` (``f`` is ~570 x near 0): singular values below that fraction of ``s``
  are (rounding) noise and end near 0, the rank-aware cut of the polar factor.

``derive()`` recomputes the table; ``verify()`` measures, in float64 on a grid of a
million points, the claims that ``svdcond_jax.orthogonal`` states (tests/test_orthogonal.py
checks both).
"""

from __future__ import annotations

import numpy as np

LOW = 3e-3  # lower end of the design interval of sigma / s
CUSHION = 1e-2  # relative widening of every interval
STEPS = 5  # optax.contrib.muon's ns_steps: the same number of matrix products
CUT_LEVEL = 1e-2  # the cut: the largest x with f <= CUT_LEVEL on [0, x]

Coefficients = tuple[tuple[float, float, float], ...]


def minimax_step(lo: float, hi: float, points: int = 4000) -> tuple[np.ndarray, float]:
    """The odd quintic ``x (a + b x^2 + c x^4)`` closest to 1 on ``[lo, hi]`` (max norm).

    A linear program on a grid (geometric and uniform, ``points`` each): minimise ``E``
    subject to ``|p(x_i) - 1| <= E``. Returns ``((a, b, c), E)``.
    """
    from scipy.optimize import linprog

    x = np.unique(np.concatenate([np.geomspace(lo, hi, points), np.linspace(lo, hi, points)]))
    basis = np.stack([x, x**3, x**5], axis=1)
    ones = np.ones((x.size, 1))
    a_ub = np.block([[basis, -ones], [-basis, -ones]])
    b_ub = np.concatenate([np.ones(x.size), -np.ones(x.size)])
    res = linprog([0, 0, 0, 1], A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * 3 + [(0, None)],
                  method="highs")
    if not res.success:
        raise RuntimeError(f"minimax_step({lo}, {hi}): {res.message}")
    return res.x[:3], float(res.x[3])


def derive(low: float = LOW, cushion: float = CUSHION, steps: int = STEPS) -> Coefficients:
    """Greedy minimax schedule: step t fitted on the (cushioned) image of step t - 1."""
    lo, hi = low, 1.0 + cushion
    out = []
    for _ in range(steps):
        coeffs, err = minimax_step(lo, hi)
        out.append(tuple(float(c) for c in coeffs))
        lo, hi = (1.0 - err) / (1.0 + cushion), (1.0 + err) * (1.0 + cushion)
    return tuple(out)


def compose(coeffs: Coefficients, x: np.ndarray) -> np.ndarray:
    """``f(x)``: the singular value map of the whole iteration, in float64."""
    x = np.asarray(x, np.float64)
    for a, b, c in coeffs:
        x = x * (a + b * x**2 + c * x**4)
    return x


def verify(coeffs: Coefficients, low: float = LOW, cushion: float = CUSHION,
           cut_level: float = CUT_LEVEL) -> dict[str, float | bool]:
    """Measured properties of ``f`` on dense float64 grids.

    Returns:
      ``error``: max |f - 1| on [low, 1 + cushion]; ``cut``: the largest grid x with
      f <= cut_level on [0, x]; ``slope``: f'(0) (product of the linear coefficients);
      ``increasing``: f increasing on [0, low]; ``max``: max f on [0, 1 + cushion];
      ``min_after_cut``: min f on [low, 1 + cushion].
    """
    inside = np.unique(np.concatenate([np.geomspace(low, 1 + cushion, 500_000),
                                       np.linspace(low, 1 + cushion, 500_000)]))
    below = np.geomspace(1e-12, low, 500_000)
    f_in, f_below = compose(coeffs, inside), compose(coeffs, below)
    over = f_below > cut_level
    cut = float(below[np.argmax(over)]) if over.any() else low
    return {
        "error": float(np.abs(f_in - 1).max()),
        "cut": cut,
        "slope": float(np.prod([c[0] for c in coeffs])),
        "increasing": bool(np.all(np.diff(f_below) > 0)),
        "max": float(max(f_in.max(), f_below.max())),
        "min_after_cut": float(f_in.min()),
    }


def main() -> None:
    coeffs = derive()
    print("POLAR_EXPRESS_COEFFS = (")
    for a, b, c in coeffs:
        print(f"    ({a!r}, {b!r}, {c!r}),")
    print(")")
    for key, value in verify(coeffs).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
