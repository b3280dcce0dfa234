"""Conditioning curves per method (log-scale kappa vs step, like the paper's Figs. 1-5)
beside the validation error of every seed.

Left, per method with its own colour, line style and marker (methods whose curves coincide
stay visible), median over runs (seeds, and folds with k-fold; the spread is in the table):

1. kappa(P + eps*I), the condition number (Eq. 1) of the matrix the meta-layer actually
   decomposes, read in float64 from the run's "conditioning" records.
2. kappa on the non-zero spectrum: lambda_max over the smallest eigenvalue above the
   numerical-rank threshold (``kappa_nonzero`` of svdcond_jax.training.monitor). The raw
   covariance P is often singular (a 3x3 stem from C_in channels has rank at most 9*C_in;
   a GCP covariance from 49 samples has rank <= 49 < 256; docs/conditioning.md), and its
   float64 kappa is then not a number; this one is, and equals raw kappa(P) when P is
   non-singular.
3. The raw covariance's state: its numerical rank against its size (dotted); below the
   dotted line P is singular. No kappa is drawn there.

Right: the validation error of each seed per method (dots), its mean (bar) and the paired
difference to svd with its exact sign-flip 95% interval (experiments/tables.py). A caption
under the figure says which kappa the paper plots and why the two kappas can disagree.

Usage:
    python -m experiments.plot --workdir runs/demo [--out runs/demo/conditioning.png]

Example:
    >>> from experiments import tables                            # doctest: +SKIP
    >>> plot_conditioning(tables.collect_runs("runs/demo"), "kappa.png")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib
from absl import flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import flags as exp_flags  # noqa: E402
from . import tables  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Curve:
    """One method's conditioning over training, aggregated over its seeds.

    Attributes:
      method: the method name.
      steps: (T,) training steps with a conditioning record.
      kappa_eps: (T,) median over seeds of kappa(P + eps*I).
      kappa_eps_lo: (T,) minimum over seeds.
      kappa_eps_hi: (T,) maximum over seeds.
      kappa_nonzero: (T,) median over seeds of kappa on the non-zero spectrum.
      kappa_nonzero_lo: (T,) minimum over seeds.
      kappa_nonzero_hi: (T,) maximum over seeds.
      kappa_raw: (T,) median raw kappa where no seed is singular, NaN elsewhere.
      singular: (T,) True where any seed's raw covariance is singular.
      rank: (T,) median numerical rank over seeds (NaN if not logged).
      dim: the matrix size (None if not logged).
      num_seeds: how many seeds the curve aggregates.
      num_runs: how many runs (seeds x folds with k-fold).
    """

    method: str
    steps: np.ndarray
    kappa_eps: np.ndarray
    kappa_eps_lo: np.ndarray
    kappa_eps_hi: np.ndarray
    kappa_nonzero: np.ndarray
    kappa_nonzero_lo: np.ndarray
    kappa_nonzero_hi: np.ndarray
    kappa_raw: np.ndarray
    singular: np.ndarray
    rank: np.ndarray
    dim: int | None
    num_seeds: int = 1
    num_runs: int = 1


def _num(value: Any) -> float:
    """A finite float from a JSON value; NaN for null / non-numbers / the 1/eps cap."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) and value < tables.KAPPA_CAP else math.nan


def _is_singular(record: dict[str, Any]) -> bool:
    if record.get("singular") is not None:
        return bool(record["singular"])
    return math.isnan(_num(record.get("kappa_raw")))


def _med_lo_hi(values: Sequence[Sequence[float]]) -> tuple[np.ndarray, ...]:
    """Per-step median, min and max over seeds, ignoring NaN (NaN where all are)."""
    out = [], [], []
    for v in values:
        v = np.asarray(v, dtype=float)
        ok = v[np.isfinite(v)]
        for arr, fn in zip(out, (np.median, np.min, np.max), strict=True):
            arr.append(float(fn(ok)) if ok.size else math.nan)
    return tuple(np.array(a) for a in out)


def curve(method: str, runs: Sequence[tables.Run]) -> Curve | None:
    """Aggregates one method's conditioning records over seeds, step by step.

    Args:
      method: the method name.
      runs: its runs.

    Returns:
      The curve, or None if no run logged conditioning.
    """
    by_step: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        for rec in run.conditioning:
            by_step.setdefault(int(rec["step"]), []).append(rec)
    if not by_step:
        return None
    steps = np.array(sorted(by_step))
    column = lambda key: [[_num(r.get(key)) for r in by_step[s]] for s in steps]
    eps, eps_lo, eps_hi = _med_lo_hi(column("kappa_eps"))
    nz, nz_lo, nz_hi = _med_lo_hi(column("kappa_nonzero"))
    singular = np.array([any(_is_singular(r) for r in by_step[s]) for s in steps])
    raw = _med_lo_hi(column("kappa_raw"))[0]
    raw[singular] = math.nan
    dims = [r.get("dim") for s in steps for r in by_step[s] if r.get("dim") is not None]
    return Curve(
        method=method, steps=steps,
        kappa_eps=eps, kappa_eps_lo=eps_lo, kappa_eps_hi=eps_hi,
        kappa_nonzero=nz, kappa_nonzero_lo=nz_lo, kappa_nonzero_hi=nz_hi,
        kappa_raw=raw, singular=singular,
        rank=_med_lo_hi(column("rank"))[0],
        dim=int(dims[-1]) if dims else None,
        num_seeds=len({r.seed for r in runs}),
        num_runs=len(runs),
    )


def curves(runs: Sequence[tables.Run]) -> list[Curve]:
    """One `Curve` per method (in the runs' order), skipping methods without records."""
    grouped: dict[str, list[tables.Run]] = {}
    for run in runs:
        grouped.setdefault(run.method, []).append(run)
    out = [curve(m, rs) for m, rs in grouped.items()]
    return [c for c in out if c is not None]


def _label(c: Curve) -> str:
    """Legend text: the method, its seed count, and the raw covariance's status."""
    seeds = f", {c.num_seeds} seeds" if c.num_seeds > 1 else ""
    if c.num_runs > c.num_seeds:
        seeds += f" x {c.num_runs // c.num_seeds} folds" if c.num_runs % c.num_seeds == 0 \
            else f", {c.num_runs} runs"
    if not c.singular.any():
        return f"{c.method}{seeds}"
    share = c.singular.mean()
    finite_rank = c.rank[np.isfinite(c.rank)]
    rank = f"rank {int(finite_rank[-1])}/{c.dim}" if finite_rank.size and c.dim else "rank<dim"
    where = "" if share >= 0.995 else f" at {100 * share:.0f}% of steps"
    return f"{c.method}{seeds} (raw P singular{where}, {rank})"


_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _style(i: int, color: str, n_points: int) -> dict[str, Any]:
    """Colour, line style and marker of the i-th method (coinciding curves stay visible)."""
    return {"color": color, "ls": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(
        _MARKERS)], "markevery": max(n_points // 8, 1), "ms": 4.5, "mfc": "none", "lw": 1.4}


def _error_panel(ax: Any, runs: Sequence[tables.Run], order: Sequence[str],
                 colors: Sequence[str]) -> None:
    """Validation error per method: one dot per seed, the mean as a bar, and the paired
    difference to svd with its 95% interval (tables.versus) as text."""
    rows = {r["method"]: r for r in tables.aggregate(runs)}
    for i, method in enumerate(order):
        row = rows.get(method)
        if row is None or not row["seed_errors"]:
            continue
        errors = np.array(list(row["seed_errors"].values()))
        jitter = np.linspace(-0.18, 0.18, errors.size) if errors.size > 1 else np.zeros(1)
        ax.plot(errors, i + jitter, "o", ms=3.5, mfc="none", color=colors[i], alpha=0.8)
        ax.plot([errors.mean()] * 2, [i - 0.3, i + 0.3], color=colors[i], lw=2.5)
        diff, interval = row.get("vs_svd_diff"), row.get("vs_svd_interval")
        if diff is not None and interval is not None:
            text = (f"{diff:+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]"
                    + (" *" if row.get("vs_svd_separable") else ""))
        elif diff is not None:
            text = f"{diff:+.2f} ({row.get('vs_svd_pairs')} pairs)"
        else:
            text = "reference" if method == "svd" else ""
        ax.annotate(text, (1.0, i), xycoords=("axes fraction", "data"), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=7.5)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlabel("validation error (%)")
    ax.set_title("Validation error per seed (bar: mean)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)


CAPTION = (
    "P: covariance of the Pre-SVD layer's output (float64). Left, top: κ(P + εI), the "
    "matrix the meta-layer decomposes; the paper's Figs. 1-4 plot 'the covariance "
    "conditioning' (Eq. 1) without saying whether ε is included; its values (1e12 for SVD"
    " with ε = 1e-2) would need λmax ≈ 1e10 to be κ(P + εI) ≤ 1 + λmax/ε, so they are "
    "most likely κ of the raw, singular P read in finite precision. Left, middle: κ on "
    "the non-zero spectrum (λmax over the smallest eigenvalue above the rank threshold), "
    "which does not change with the scale of the weights. The two can rank methods in "
    "opposite orders: for a singular P, κ(P + εI) ≈ λmax/ε grows with the Pre-SVD weight "
    "norm (NOG's fixed-size steps grow it), while the non-zero spectrum can get flatter "
    "at the same time (docs/conditioning.md). Curves: median over runs. Right: Δ = mean "
    "paired difference to svd (points) [exact sign-flip 95% interval], * = "
    "interval excludes 0."
)


def plot_conditioning(
    runs: Sequence[tables.Run], out_path: str | Path, *, title: str | None = None
) -> Path:
    """Draws the conditioning curves and the validation error of a sweep.

    Left: kappa(P + eps*I), kappa on the non-zero spectrum and the rank of P vs step
    (median over runs, one colour, line style and marker per method). Right: the
    validation error of every seed per method, its mean, and the paired difference to
    svd with its interval. Below: a caption saying which kappa the paper plots and why
    the two kappas can disagree.

    Args:
      runs: runs from `tables.collect_runs` (several methods, several seeds).
      out_path: PNG path (parent directories are created).
      title: figure title (default: a description of the curves).

    Returns:
      The written path.

    Raises:
      ValueError: if no run has conditioning records.
    """
    cs = curves(runs)
    if not cs:
        raise ValueError("no run has 'conditioning' records to plot")
    fig = plt.figure(figsize=(13.0, 11.5), layout="constrained")
    grid = fig.add_gridspec(4, 2, width_ratios=[2.1, 1.0], height_ratios=[3, 3, 1.5, 1.1])
    ax = fig.add_subplot(grid[0, 0])
    ax_nz = fig.add_subplot(grid[1, 0], sharex=ax)
    ax_rank = fig.add_subplot(grid[2, 0], sharex=ax)
    ax_err = fig.add_subplot(grid[:3, 1])
    ax_caption = fig.add_subplot(grid[3, :])
    ax_caption.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = list(dict.fromkeys(r.method for r in runs))
    color_of = {m: colors[i % len(colors)] for i, m in enumerate(order)}
    handles = []
    for i, c in enumerate(cs):
        style = _style(i, color_of[c.method], len(c.steps))
        (h,) = ax.plot(c.steps, c.kappa_eps, label=_label(c), **style)
        handles.append(h)
        ax_nz.plot(c.steps, c.kappa_nonzero, **style)
        # ranks are small integers that often coincide: a small offset keeps each visible
        offset = 0.08 * (i - (len(cs) - 1) / 2)
        ax_rank.plot(c.steps, c.rank + offset, drawstyle="steps-post",
                     **{**style, "marker": None})
    _finish_axes(ax, ax_nz, ax_rank, cs)
    _error_panel(ax_err, runs, order, [color_of[m] for m in order])
    fig.suptitle(title or "Covariance conditioning of the Pre-SVD features", fontsize=12)
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8,
               frameon=False)
    ax_caption.text(0.0, 1.0, textwrap.fill(CAPTION, 175), fontsize=8, va="top",
                    ha="left", transform=ax_caption.transAxes)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_path


def _log_axis(ax: Any, cs: Sequence[Curve], attrs: Sequence[str]) -> None:
    if any(np.isfinite(getattr(c, a)).any() for c in cs for a in attrs):
        ax.set_yscale("log")


def _finish_axes(ax, ax_nz, ax_rank, cs: Sequence[Curve]) -> None:
    _log_axis(ax, cs, ["kappa_eps"])
    if not any(np.isfinite(c.kappa_eps).any() for c in cs):  # GCP: eps = 0, P singular
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no finite κ(P + εI): ε = 0 and P is singular at every step\n"
                "(κ on the non-zero spectrum and the rank are below)", ha="center",
                va="center", transform=ax.transAxes, fontsize=10, color="gray")
    ax.set_ylabel("κ(P + εI)")
    ax.set_title("κ(P + εI): what the layer decomposes", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    _log_axis(ax_nz, cs, ["kappa_nonzero"])
    ax_nz.set_ylabel("κ, non-zero spectrum")
    ax_nz.set_title("κ on the non-zero spectrum: scale-free shape of P", fontsize=10)
    ax_nz.grid(True, which="major", alpha=0.3)
    dims = {c.dim for c in cs if c.dim is not None}
    for d in dims:
        ax_rank.axhline(d, color="gray", ls=":", lw=1.0)
        ax_rank.annotate(f"dim = {d}", (1.0, d), xycoords=("axes fraction", "data"),
                         ha="right", va="bottom", fontsize=7, color="gray")
    ax_rank.set_ylabel("rank of P")
    ax_rank.set_title("numerical rank of P (below the dotted line: singular)", fontsize=10)
    ax_rank.set_xlabel("training step")
    ax_rank.grid(True, alpha=0.3)
    if dims:
        ax_rank.set_ylim(0, max(dims) * 1.25)


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI: plot every run of a sweep directory; returns the PNG's path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = exp_flags.new_flag_values()
    flags.DEFINE_string("workdir", None, "sweep directory holding "
                        "<method>/seed<k>/metrics.jsonl", flag_values=fv)
    flags.DEFINE_string("out", None, "PNG path (default: <workdir>/conditioning.png)",
                        flag_values=fv)
    flags.DEFINE_list("methods", None, "subset, in order", flag_values=fv)
    flags.DEFINE_string("title", None, "figure title", flag_values=fv)
    exp_flags.parse(fv, argv, doc=__doc__)
    if not fv.workdir:
        raise SystemExit("error: --workdir is required")
    exp_flags.initialize_distributed(fv)
    runs = tables.collect_runs(fv.workdir, fv.methods or None)
    out = Path(fv.out or Path(fv.workdir) / "conditioning.png")
    if jax.process_index() == 0:
        plot_conditioning(runs, out, title=fv.title)
        print(out)
    return out


def cli() -> None:
    """The ``svdcond-plot`` console script."""
    exp_flags.run_app(main)


if __name__ == "__main__":
    cli()
