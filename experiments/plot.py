"""Conditioning curves per method (log-scale kappa vs step), like the paper's Figs. 1-5.

The main panel is kappa(P + eps*I), the condition number (Eq. 1) of the matrix the
meta-layer actually decomposes, read in float64 from the run's "conditioning" records.
The raw covariance P is often singular (a 3x3 stem from C_in channels has rank at most
9*C_in; a GCP covariance from 49 samples has rank <= 49 < 256; docs/conditioning.md),
so its float64 kappa (~1e15-1e16) is not a number worth drawing. The second panel draws
raw kappa(P) only at steps where P is non-singular and marks singular steps with "x"
along its top edge (legend: "raw P singular, rank r/d"); the third shows the numerical
rank against the matrix size.

Usage:
    python -m experiments.plot runs/demo --out runs/demo/conditioning.png

Example:
    >>> from experiments import tables                            # doctest: +SKIP
    >>> plot_conditioning(tables.collect_runs("runs/demo"), "kappa.png")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.transforms  # noqa: E402
import numpy as np  # noqa: E402

from experiments import tables  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Curve:
    """One method's conditioning over training, aggregated over its seeds.

    Attributes:
      method: the method name.
      steps: (T,) training steps with a conditioning record.
      kappa_eps: (T,) median over seeds of kappa(P + eps*I).
      kappa_eps_lo: (T,) minimum over seeds.
      kappa_eps_hi: (T,) maximum over seeds.
      kappa_raw: (T,) median raw kappa where no seed is singular, NaN elsewhere.
      singular: (T,) True where any seed's raw covariance is singular.
      rank: (T,) median numerical rank over seeds (NaN if not logged).
      dim: the matrix size (None if not logged).
    """

    method: str
    steps: np.ndarray
    kappa_eps: np.ndarray
    kappa_eps_lo: np.ndarray
    kappa_eps_hi: np.ndarray
    kappa_raw: np.ndarray
    singular: np.ndarray
    rank: np.ndarray
    dim: int | None


def _num(value: Any) -> float:
    """A finite or infinite float from a JSON value; NaN for null / non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _is_singular(record: dict[str, Any]) -> bool:
    if "singular" in record:
        return bool(record["singular"])
    raw = _num(record.get("kappa_raw"))
    return not math.isfinite(raw) or raw >= 1.0 / np.finfo(np.float64).eps


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
    eps_vals = [[_num(r.get("kappa_eps")) for r in by_step[s]] for s in steps]
    med = lambda vals: float(np.nanmedian(vals)) if np.isfinite(vals).any() else math.nan
    singular = np.array([any(_is_singular(r) for r in by_step[s]) for s in steps])
    raw = np.array([med([_num(r.get("kappa_raw")) for r in by_step[s]]) for s in steps])
    raw[singular] = math.nan
    dims = [r.get("dim") for s in steps for r in by_step[s] if r.get("dim") is not None]
    return Curve(
        method=method,
        steps=steps,
        kappa_eps=np.array([med(v) for v in eps_vals]),
        kappa_eps_lo=np.array([np.nanmin(v) if np.isfinite(v).any() else np.nan
                               for v in eps_vals]),
        kappa_eps_hi=np.array([np.nanmax(v) if np.isfinite(v).any() else np.nan
                               for v in eps_vals]),
        kappa_raw=raw,
        singular=singular,
        rank=np.array([med([_num(r.get("rank")) for r in by_step[s]]) for s in steps]),
        dim=int(dims[-1]) if dims else None,
    )


def curves(runs: Sequence[tables.Run]) -> list[Curve]:
    """One `Curve` per method (in the runs' order), skipping methods without records."""
    grouped: dict[str, list[tables.Run]] = {}
    for run in runs:
        grouped.setdefault(run.method, []).append(run)
    out = [curve(m, rs) for m, rs in grouped.items()]
    return [c for c in out if c is not None]


def _label(c: Curve) -> str:
    """Legend text: the method, and the raw covariance's status (singular, rank r/d)."""
    if not c.singular.any():
        return c.method
    share = c.singular.mean()
    finite_rank = c.rank[np.isfinite(c.rank)]
    rank = f"rank {int(finite_rank[-1])}/{c.dim}" if finite_rank.size and c.dim else "rank<dim"
    where = "" if share >= 0.995 else f" at {100 * share:.0f}% of steps"
    return f"{c.method} (raw P singular{where}, {rank})"


def plot_conditioning(
    runs: Sequence[tables.Run], out_path: str | Path, *, title: str | None = None
) -> Path:
    """Draws kappa(P + eps*I) and raw kappa(P) vs step per method (log scale), and the rank.

    Panel 1: median over seeds of kappa(P + eps*I) (band = min..max over seeds), the
    matrix the meta-layer decomposes. Panel 2: raw kappa(P), drawn only at steps where P is
    non-singular; singular steps are marked "x" along the panel's top edge instead of a
    meaningless ~1e15 line, and the legend gives the rank. Panel 3: numerical rank of P per
    method against the matrix size (dotted).

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
    fig, (ax, ax_raw, ax_rank) = plt.subplots(
        3, 1, figsize=(8.0, 9.0), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.2]}
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = matplotlib.transforms.blended_transform_factory(ax_raw.transData, ax_raw.transAxes)
    for i, c in enumerate(cs):
        color = colors[i % len(colors)]
        ax.plot(c.steps, c.kappa_eps, color=color, lw=1.6, label=c.method)
        if not np.allclose(c.kappa_eps_lo, c.kappa_eps_hi, equal_nan=True):
            ax.fill_between(c.steps, c.kappa_eps_lo, c.kappa_eps_hi, color=color, alpha=0.15)
        ax_raw.plot(c.steps, c.kappa_raw, color=color, lw=1.3, label=_label(c))
        if c.singular.any():
            y = np.full(int(c.singular.sum()), 0.97 - 0.03 * i)
            ax_raw.plot(c.steps[c.singular], y, "x", color=color, ms=4, transform=top)
        ax_rank.plot(c.steps, c.rank, color=color, lw=1.2, drawstyle="steps-post")
    _finish_axes(ax, ax_raw, ax_rank, cs, title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def _finish_axes(ax, ax_raw, ax_rank, cs: Sequence[Curve], title: str | None) -> None:
    ax.set_yscale("log")
    ax.set_ylabel("κ(P + εI)")
    ax.set_title(title or "Covariance conditioning of the Pre-SVD features (float64)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    any_raw = any(np.isfinite(c.kappa_raw).any() for c in cs)
    if any_raw:
        ax_raw.set_yscale("log")
    ax_raw.set_ylabel("raw κ(P)  (x: P singular)")
    ax_raw.grid(True, which="major", alpha=0.3)
    if any(c.singular.any() for c in cs):
        ax_raw.legend(fontsize=7, loc="lower right")
        finite = [np.nanmax(c.kappa_raw) for c in cs if np.isfinite(c.kappa_raw).any()]
        if finite:  # headroom above the curves for the "singular" markers
            ax_raw.set_ylim(top=max(finite) * 100.0)
    dims = {c.dim for c in cs if c.dim is not None}
    for d in dims:
        ax_rank.axhline(d, color="gray", ls=":", lw=1.0)
        ax_rank.annotate(f"dim = {d}", (1.0, d), xycoords=("axes fraction", "data"),
                         ha="right", va="bottom", fontsize=7, color="gray")
    ax_rank.set_ylabel("numerical rank")
    ax_rank.set_xlabel("training step")
    ax_rank.grid(True, alpha=0.3)
    if dims:
        ax_rank.set_ylim(0, max(dims) * 1.2)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: plot every run of a sweep directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="sweep directory holding <method>/seed<k>/metrics.jsonl")
    parser.add_argument("--out", default=None,
                        help="PNG path (default: <workdir>/conditioning.png)")
    parser.add_argument("--methods", default=None, help="comma-separated subset, in order")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    methods = args.methods.split(",") if args.methods else None
    runs = tables.collect_runs(args.workdir, methods)
    out = args.out or Path(args.workdir) / "conditioning.png"
    print(plot_conditioning(runs, out, title=args.title))


if __name__ == "__main__":
    main()
