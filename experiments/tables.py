"""Turn the runs' `metrics.jsonl` files into the paper's tables (Tables 1-5).

A sweep lives in `<workdir>/<method>/seed<k>/metrics.jsonl`, or, with k-fold
cross-validation (`config.cv_folds`), `<workdir>/<method>/seed<k>/fold<f>/metrics.jsonl`
(the layouts written by `experiments/run.py`). Each run's summary record (the last line,
kind "summary") gives the final validation error and the number of validation images, the
SVD-failure count and the final/median condition numbers; the "conditioning" records give
the numerical rank of the Pre-SVD covariance.

Per method we report what the paper reports in Tables 1-4 (validation error over seeds,
mean +- std and min; docs/applications.md) and Table 5 (the number of SVD failures),
plus the conditioning of Figs. 1-5: kappa(P + eps*I) (the matrix the meta-layer really
decomposes) and whether the raw covariance was singular (docs/conditioning.md). A seed's
error is pooled over its folds (wrong / validated images, every image once). Methods are
compared with the reference (``svd``) by the per-seed paired difference: its mean and the
exact sign-flip 95% interval (experiments/stats.py); "separable" means the interval
excludes 0. A config may name further pairs of rows (``COMPARISONS``): each is compared the
same way, in a second table (:func:`compare`, :func:`comparisons_table`). Each run's
``provenance.json`` (experiments/provenance.py) says where it was
trained; the tables quote it.

Example:
    >>> rows = aggregate(collect_runs("runs/cifar100"))        # doctest: +SKIP
    >>> print(markdown_table(rows))                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from svdcond_jax.training import writers
from svdcond_jax.training.monitor import KAPPA_CAP
from svdcond_jax.training.writers import METRICS_FILE

from . import provenance, stats

_SEED_DIR = re.compile(r"^seed(\d+)$")
_FOLD_DIR = re.compile(r"^fold(\d+)$")
PROVENANCE_FILE = "provenance.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run read back from its metrics file.

    Attributes:
      method: paper row name (e.g. "svd+nog+ow+olr").
      seed: the run's seed.
      path: the metrics.jsonl file.
      summary: the "summary" record ({} if the run did not finish).
      conditioning: the "conditioning" records in step order.
      evals: the "eval" records in step order.
      train: the "train" records in step order.
      fold: the validated fold (k-fold layout `seed<k>/fold<f>`), else None.
      provenance: the run's provenance.json ({} if absent).
    """

    method: str
    seed: int
    path: Path
    summary: dict[str, Any]
    conditioning: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    train: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fold: int | None = None  # the validated fold (k-fold layout), else None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_run(path: str | Path, *, method: str | None = None, seed: int | None = None) -> Run:
    """Loads one run's metrics file into a `Run`.

    Method and seed default to the summary record's fields, then to the directory names
    `<method>/seed<k>/metrics.jsonl` (or `<method>/seed<k>/fold<f>/metrics.jsonl`).

    Args:
      path: the run's metrics.jsonl (or its directory).
      method: the method name, if known.
      seed: the seed, if known.

    Returns:
      The run.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = writers.read_metrics(str(path.parent))
    summaries = [r for r in records if r.get("kind") == "summary"]
    summary = summaries[-1] if summaries else {}
    fold_match = _FOLD_DIR.match(path.parent.name)
    seed_dir = path.parent.parent if fold_match else path.parent
    if method is None:
        method = summary.get("method") or seed_dir.parent.name
    if seed is None:
        match = _SEED_DIR.match(seed_dir.name)
        seed = int(summary.get("seed", match.group(1) if match else 0))
    fold = int(fold_match.group(1)) if fold_match else None
    prov_path = path.parent / PROVENANCE_FILE
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    by_step = lambda kind: sorted(
        (r for r in records if r.get("kind") == kind), key=lambda r: r.get("step", 0)
    )
    return Run(method, int(seed), path, summary, by_step("conditioning"), by_step("eval"),
               by_step("train"), fold, prov)


def collect_runs(workdir: str | Path, methods: Sequence[str] | None = None) -> list[Run]:
    """Finds every `<workdir>/<method>/seed<k>[/fold<f>]/metrics.jsonl` of a sweep.

    Args:
      workdir: the sweep's root directory.
      methods: keep only these methods, in this order (default: all found, sorted).

    Returns:
      The runs, grouped by method in the requested order, then by seed and fold.

    Raises:
      ValueError: if `workdir` holds no metrics file.
    """
    workdir = Path(workdir)
    paths = sorted([*workdir.glob(f"*/seed*/{METRICS_FILE}"),
                    *workdir.glob(f"*/seed*/fold*/{METRICS_FILE}")])
    if not paths:
        raise ValueError(f"workdir={str(workdir)!r} holds no */seed*/{METRICS_FILE}")
    runs = [load_run(p, method=(p.parents[2] if _FOLD_DIR.match(p.parent.name)
                                else p.parents[1]).name) for p in paths]
    order = {m: i for i, m in enumerate(methods if methods is not None
                                        else sorted({r.method for r in runs}))}
    runs = [r for r in runs if r.method in order]
    runs.sort(key=lambda r: (order[r.method], r.seed, -1 if r.fold is None else r.fold))
    return runs


def _finite(values: Iterable[Any]) -> list[float]:
    """Keeps the finite numbers (drops None, NaN, inf and non-numbers)."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def _stat(values: Sequence[float], fn) -> float | None:
    return float(fn(values)) if values else None


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1, as torch/the paper); 0.0 for a single run."""
    if not values:
        return None
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _kappas(values: Iterable[Any]) -> list[float]:
    """Finite condition numbers; drops None and the 1/eps cap (a singular matrix's)."""
    return [v for v in _finite(values) if v < KAPPA_CAP]


def _median(values: Sequence[float]) -> float | None:
    """Median across seeds (kappa spans decades, so a median is the honest summary)."""
    return float(np.median(values)) if values else None


def _singular_fraction(run: Run) -> float | None:
    flags = [bool(r["singular"]) for r in run.conditioning
             if r.get("singular") is not None]  # None: a non-finite (skipped) step
    return float(np.mean(flags)) if flags else None


def _median_raw_kappa(run: Run) -> float | None:
    """Median over monitored steps of raw kappa(P), over non-singular steps only."""
    vals = _kappas(r.get("kappa_raw") for r in run.conditioning if not r.get("singular"))
    return float(np.median(vals)) if vals else None


def _median_nonzero_kappa(run: Run) -> float | None:
    """Median over monitored steps of kappa on the non-zero spectrum (monitor.py)."""
    vals = _kappas(r.get("kappa_nonzero") for r in run.conditioning)
    return float(np.median(vals)) if vals else None


def _final_nonzero_kappa(run: Run) -> float | None:
    vals = _kappas([run.conditioning[-1].get("kappa_nonzero")]) if run.conditioning else []
    return vals[0] if vals else None


def _weight_norm_growth(run: Run) -> float | None:
    """Pre-SVD weight norm at the last monitored step over the first (NOG grows it)."""
    norms = _finite(r.get("weight_norm") for r in run.conditioning)
    return norms[-1] / norms[0] if len(norms) > 1 and norms[0] > 0 else None


def _olr_active_fraction(run: Run) -> float | None:
    """Share of logged steps where OLR's eta* was used (0 < eta < the schedule's lr)."""
    pairs = [(_finite([r.get("olr_eta")]), _finite([r.get("learning_rate")]))
             for r in run.train]
    pairs = [(e[0], lr[0]) for e, lr in pairs if e and lr]
    return float(np.mean([0 < e < lr * (1 - 1e-6) for e, lr in pairs])) if pairs else None


def _result(run: Run) -> float | None:
    """The run's final validation error if it is a result (finished, whole history)."""
    if not run.summary or run.summary.get("complete") is False:
        return None
    values = _finite([run.summary.get("val_error")])
    return values[0] if values else None


def seed_errors(runs: Sequence[Run]) -> dict[int, tuple[float, int | None]]:
    """Validation error (%) and validated images per seed, over one method's runs.

    Without folds a seed is one run. With k-fold runs (``fold`` set) a seed's error pools
    its K folds: sum of wrong predictions over sum of validated images (each fold's error
    weighted by its ``val_examples``), so every image counts once; a seed missing a fold
    or one of whose folds has no result is left out.

    Returns:
        seed -> (error %, validated images or None when the runs do not record it).
    """
    by_seed: dict[int, list[Run]] = {}
    for run in runs:
        by_seed.setdefault(run.seed, []).append(run)
    out = {}
    for seed, group in sorted(by_seed.items()):
        results = [(r, _result(r)) for r in group]
        if any(e is None for _, e in results):
            continue
        if group[0].fold is None:
            run, error = results[0]
            out[seed] = (error, run.summary.get("val_examples"))
            continue
        folds = max(int(r.summary.get("cv_folds") or 0) for r in group)
        if sorted(r.fold for r in group) != list(range(folds)):
            continue
        sizes = [r.summary.get("val_examples") for r in group]
        weights = [n if n else 1 for n in sizes]
        error = sum(w * e for w, (_, e) in zip(weights, results, strict=True)) / sum(weights)
        out[seed] = (float(error), sum(sizes) if all(sizes) else None)
    return out


def run_errors(runs: Sequence[Run]) -> dict[str, float]:
    """Validation error (%) per run with a result, keyed "<seed>" or "<seed>/<fold>": the
    pairing units of :func:`versus` (a run of one method pairs with the run of the same
    seed and fold of another: same initial parameters, same training images and batches,
    same validation images)."""
    out = {}
    for run in runs:
        error = _result(run)
        if error is not None:
            out[str(run.seed) if run.fold is None else f"{run.seed}/{run.fold}"] = error
    return out


def provenance_summary(runs: Sequence[Run]) -> dict[str, Any]:
    """Where the runs were trained: each provenance field's value (a list where the runs
    differ) and the first/last date; {} when no run recorded it."""
    facts = [r.provenance for r in runs if r.provenance]
    if not facts:
        return {}
    out: dict[str, Any] = {}
    for key in sorted({k for f in facts for k in f} - {"date"}):
        values = sorted({json.dumps(f.get(key)) for f in facts})
        decoded = [json.loads(v) for v in values]
        out[key] = decoded[0] if len(decoded) == 1 else decoded
    dates = sorted(f["date"] for f in facts if f.get("date"))
    out["date"] = dates[0] if dates and dates[0] == dates[-1] else (
        f"{dates[0]} .. {dates[-1]}" if dates else None)
    out["runs"] = len(facts)
    return out


def provenance_line(summary: Mapping[str, Any]) -> str:
    """One line for a table: provenance.line with lists shown as 'a | b'."""
    flat = {k: " | ".join(map(str, v)) if isinstance(v, list) else v
            for k, v in summary.items()}
    return provenance.line(flat) + f" ({summary.get('runs')} runs)"


def aggregate_method(method: str, runs: Sequence[Run]) -> dict[str, Any]:
    """Aggregates one method's runs into a table row.

    Args:
      method: the method name.
      runs: its runs (one per seed).

    Returns:
      A JSON-able dict: val_error_mean / _std / _min / _max (percent, over the seeds with
      a result; a seed's error pools its folds, :func:`seed_errors`), seed_errors
      ({seed: error}), run_errors (:func:`run_errors`), num_seeds, folds (0 without
      k-fold), val_images (validated images per seed),
      best_val_error_min, failures_total, runs_with_failures, final_kappa_eps and
      median_kappa_eps (medians over seeds), final_kappa_raw, median_kappa_raw (median
      over the non-singular monitored steps, then over seeds), singular_fraction (share of
      monitored steps where the raw covariance was singular), rank / dim (last record of
      the first run), weight_norm_growth (Pre-SVD ||W|| last/first monitored step, median
      over seeds), olr_active_fraction (share of logged steps where OLR's eta* < lr, mean
      over seeds), train_time_s (mean), seeds, num_runs, num_finished, num_incomplete.
      A run counts as finished only when its summary is a result: runs whose summary says
      ``"complete": false`` (metrics.jsonl lost part of the history) are counted in
      num_incomplete and left out of every number (their records too).
    """
    incomplete = [r for r in runs if r.summary and r.summary.get("complete") is False]
    all_runs, runs = runs, [r for r in runs if all(r is not i for i in incomplete)]
    done = [r for r in runs if r.summary]
    s = lambda key: _finite(r.summary.get(key) for r in done)
    per_seed = seed_errors(runs)
    errors = [e for e, _ in per_seed.values()]
    images = {n for _, n in per_seed.values()}
    failures = [int(r.summary.get("svd_failures") or 0) for r in done]
    singular = _finite(_singular_fraction(r) for r in runs)
    last = next((r.conditioning[-1] for r in runs if r.conditioning), {})
    return {
        "method": method,
        "seeds": [r.seed for r in all_runs],
        "num_runs": len(all_runs),
        "num_finished": len(done),
        "num_incomplete": len(incomplete),
        "num_seeds": len(per_seed),
        "folds": max((r.fold + 1 for r in all_runs if r.fold is not None), default=0),
        "seed_errors": {str(k): e for k, (e, _) in per_seed.items()},
        "run_errors": run_errors(runs),
        "val_images": images.pop() if len(images) == 1 else None,
        "val_error_mean": _stat(errors, np.mean),
        "val_error_std": _std(errors),
        "val_error_min": _stat(errors, np.min),
        "val_error_max": _stat(errors, np.max),
        "best_val_error_min": _stat(s("best_val_error"), np.min),
        "failures_total": int(sum(failures)),
        "runs_with_failures": int(sum(f > 0 for f in failures)),
        "final_kappa_eps": _median(_kappas(s("final_kappa_eps"))),
        "median_kappa_eps": _median(_kappas(s("median_kappa_eps"))),
        "final_kappa_raw": _median(_kappas(r.summary.get("final_kappa_raw") for r in done
                                           if not r.summary.get("final_singular"))),
        "median_kappa_raw": _median(_finite(_median_raw_kappa(r) for r in runs)),
        "final_kappa_nonzero": _median(_finite(_final_nonzero_kappa(r) for r in runs)),
        "median_kappa_nonzero": _median(_finite(_median_nonzero_kappa(r) for r in runs)),
        "singular_fraction": _stat(singular, np.mean),
        "rank": last.get("rank"),
        "dim": last.get("dim"),
        "weight_norm_growth": _median(_finite(_weight_norm_growth(r) for r in runs)),
        "olr_active_fraction": _stat(_finite(_olr_active_fraction(r) for r in runs), np.mean),
        "train_time_s": _stat(s("train_time_s"), np.mean),
        "compile_time_s": _stat(s("compile_time_s"), np.sum),
    }


def versus(row: Mapping[str, Any], ref: Mapping[str, Any] | None,
           confidence: float = 0.95) -> dict[str, Any]:
    """A row's paired difference to the reference row (``svd``).

    The pairs are runs of the same seed (and, with k-fold, the same fold) in both rows
    (:func:`run_errors`): d = error(row, run) - error(ref, run) in points. Returns their
    mean and the exact sign-flip interval (:func:`stats.sign_flip_interval`; None below
    6 pairs at 95%). Separable: the interval excludes 0. With k-fold runs the mean of d
    over whole seeds is the difference of the seeds' pooled errors (up to the folds'
    size difference of at most one image).

    Returns:
      ``{"diff": mean d or None, "interval": [lo, hi] or None, "separable": True / False /
      None (no interval), "pairs": number of paired runs}``.
    """
    if ref is None or row is ref:
        return {"diff": None, "interval": None, "separable": None, "pairs": 0}
    mine, theirs = row["run_errors"], ref["run_errors"]
    units = sorted(set(mine) & set(theirs))
    if not units:
        return {"diff": None, "interval": None, "separable": None, "pairs": 0}
    d = [mine[k] - theirs[k] for k in units]
    interval = stats.sign_flip_interval(d, confidence)
    return {"diff": float(np.mean(d)), "interval": None if interval is None else list(interval),
            "separable": None if interval is None else bool(interval[0] > 0 or interval[1] < 0),
            "pairs": len(units)}


def aggregate(runs: Sequence[Run], *, reference: str = "svd") -> list[dict[str, Any]]:
    """Aggregates runs into one row per method, keeping the runs' method order.

    Each row also gets ``vs_<reference>_diff``, ``_interval``, ``_separable`` and
    ``_pairs`` (:func:`versus`) when the reference method is among the runs.
    """
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.method, []).append(run)
    rows = [aggregate_method(m, rs) for m, rs in grouped.items()]
    ref = next((r for r in rows if r["method"] == reference), None)
    for row in rows:
        for key, value in versus(row, ref).items():
            row[f"vs_{reference}_{key}"] = value
    return rows


def compare(rows: Sequence[Mapping[str, Any]], comparisons: Sequence[tuple[str, str]],
            confidence: float = 0.95) -> list[dict[str, Any]]:
    """Paired differences between named rows: for each ``(a, b)``, error(a) - error(b).

    Paired and tested as :func:`versus` (same seed and fold in both rows).

    Args:
      rows: output of :func:`aggregate`.
      comparisons: pairs of method names; both must be rows.
      confidence: of the sign-flip interval.

    Returns:
      One ``{"method", "versus", "diff", "interval", "separable", "pairs"}`` per pair.

    Raises:
      ValueError: a named method has no row (lists the rows).
    """
    by_method = {r["method"]: r for r in rows}
    out = []
    for a, b in comparisons:
        missing = [m for m in (a, b) if m not in by_method]
        if missing:
            raise ValueError(f"comparisons: no row for {missing} (rows: {sorted(by_method)})")
        out.append({"method": a, "versus": b,
                    **versus(by_method[a], by_method[b], confidence)})
    return out


def comparisons_table(compared: Sequence[Mapping[str, Any]]) -> str:
    """Markdown for :func:`compare`'s output: one line per pair, the difference in points."""
    lines = ["| Comparison | Paired diff (points) [95% interval] | Separable? | Pairs |",
             "|---|---|---|---|"]
    for c in compared:
        text, verdict = _fmt_paired(c)
        lines.append(f"| {c['method']} − {c['versus']} | {text} | {verdict} | {c['pairs']} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _fmt_error(r: Mapping[str, Any]) -> str:
    """'mean ± std' over seeds; the plain value for a single seed."""
    if r["num_seeds"] <= 1:
        return _fmt(r["val_error_mean"])
    return f"{_fmt(r['val_error_mean'])} ± {_fmt(r['val_error_std'])}"


def _fmt_kappa(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def _fmt_raw(row: Mapping[str, Any]) -> str:
    """Raw kappa, or 'singular (rank r/d)' where it is not a meaningful number."""
    frac = row.get("singular_fraction")
    rank, dim = row.get("rank"), row.get("dim")
    rank_txt = f"rank {rank}/{dim}" if rank is not None and dim is not None else ""
    if frac:
        share = "" if frac >= 0.995 else f" {100 * frac:.0f}%"
        return f"singular{share} ({rank_txt})" if rank_txt else f"singular{share}"
    return _fmt_kappa(row.get("final_kappa_raw"))


def design_line(rows: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> str:
    """What each row's numbers are over: seeds, validated images per seed, the comparison."""
    seeds = sorted({r["num_seeds"] for r in rows})
    images = sorted({r["val_images"] for r in rows if r.get("val_images")})
    folds = sorted({r.get("folds") for r in rows if r.get("folds")})
    text = (f"Validation error (%) over {' / '.join(map(str, seeds))} seeds per method; each "
            f"seed validates {' / '.join(map(str, images)) or 'an unrecorded number of'} "
            f"images" + (f" ({' / '.join(map(str, folds))}-fold: every image once per seed)"
                         if folds else "") + ".")
    pairs = sorted({r["vs_svd_pairs"] for r in rows if r.get("vs_svd_pairs")})
    if pairs:
        unit = "(seed, fold) runs" if folds else "seeds"
        text += (f" vs svd: mean paired difference (points) over {' / '.join(map(str, pairs))}"
                 f" {unit} (same initial parameters, batches and validation images) and its "
                 f"exact sign-flip {100 * confidence:.0f}% interval; separable = the "
                 "interval excludes 0 (needs >= 6 pairs).")
    return text


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    paper: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    compared: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Formats aggregated rows as the paper's Markdown table.

    Columns: validation error mean +- std and min over seeds (Tables 1-4), seeds (and
    runs, with folds), SVD failures (Table 5: total over runs, and how many runs had
    any), kappa(P + eps*I) final and median (Figs. 1-5), the raw covariance's kappa, final
    ("singular (rank r/d)" where it is singular) and median over the non-singular
    monitored steps, the growth of the Pre-SVD weight norm over training
    (docs/conditioning.md: NOG inflates it), the paired difference to ``svd`` with its
    interval, the compile and training time (mean per run, from the summary), the wall
    time per method when rows carry "wall_s" (compilation included), and the paper's
    number when `paper` is given. Under the title: :func:`design_line` and ``notes``
    (e.g. the provenance line).

    Args:
      rows: output of `aggregate`.
      title: optional heading line.
      paper: method -> the paper's reported value for that row.
      notes: lines printed under the title (provenance).
      compared: output of :func:`compare`, printed as a second table below.

    Returns:
      The table as a string.
    """
    wall = any(r.get("wall_s") is not None for r in rows)
    several = any(r["num_seeds"] > 1 for r in rows)
    versus_svd = any(r.get("vs_svd_diff") is not None for r in rows)
    error = "Val. error (%) mean ± std" if several else "Val. error (%)"
    cols = [
        "Method", error, "Min", "Seeds", "Failures", "κ(P+εI) final", "κ(P+εI) median",
        "κ(P) final", "κ(P) nonzero median"]
    cols += ["‖W‖ growth"]
    cols += ["vs svd: paired diff [95% interval] separable?"] * versus_svd
    cols += ["Compile (s)", "Train (s/run)"]
    cols += ["Wall (s)"] * wall + ["Paper"] * bool(paper)
    lines = [f"### {title}", ""] if title else []
    lines += [design_line(rows), *notes, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r, wall, paper, versus_svd)) + " |")
    if compared:
        lines += ["", "Further paired comparisons (same pairing and interval):", "",
                  comparisons_table(compared).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _fmt_paired(v: Mapping[str, Any]) -> tuple[str, str]:
    """(mean difference [interval], "yes"/"no"/"–") of a :func:`versus` result."""
    if v["diff"] is None:
        return "–", "–"
    if v["interval"] is None:
        return f"{v['diff']:+.2f} (no interval: {v['pairs']} pairs)", "–"
    lo, hi = v["interval"]
    return f"{v['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]", "yes" if v["separable"] else "no"


def _fmt_versus(r: Mapping[str, Any]) -> str:
    text, verdict = _fmt_paired({k: r.get(f"vs_svd_{k}")
                                 for k in ("diff", "interval", "separable", "pairs")})
    return text if verdict == "–" else f"{text} {verdict}"


def _cells(r: Mapping[str, Any], wall: bool, paper: Mapping[str, str] | None,
           versus_svd: bool = False) -> list[str]:
    """One table row's cells, in `markdown_table`'s column order."""
    n, done = r["num_runs"], r["num_finished"]
    failures = f"{r['failures_total']}"
    if done > 1 and r["failures_total"]:
        failures += f" ({r['runs_with_failures']}/{done} runs)"
    seeds = f"{r['num_seeds']}"
    if n > r["num_seeds"]:  # folds, or runs without a result
        seeds += f" ({done}/{n} runs)" if done < n else f" ({n} runs)"
    cells = [
        r["method"],
        _fmt_error(r),
        _fmt(r["val_error_min"]),
        seeds,
        failures,
        _fmt_kappa(r["final_kappa_eps"]),
        _fmt_kappa(r["median_kappa_eps"]),
        _fmt_raw(r),
        _fmt_kappa(r.get("median_kappa_nonzero")),
        _fmt(r.get("weight_norm_growth"), ".2f"),
    ]
    if versus_svd:
        cells.append(_fmt_versus(r))
    cells += [_fmt(r.get("compile_time_s"), ".1f"), _fmt(r["train_time_s"], ".1f")]
    if wall:
        cells.append(_fmt(r.get("wall_s"), ".0f"))
    if paper:
        cells.append(str(paper.get(r["method"], "–")))
    return cells


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN or Infinity), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_tables(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    stem: str = "table",
    title: str | None = None,
    paper: Mapping[str, str] | None = None,
    provenance_facts: Mapping[str, Any] | None = None,
    compared: Sequence[Mapping[str, Any]] = (),
) -> tuple[Path, Path]:
    """Writes `<stem>.md` and `<stem>.json` into `out_dir`.

    The JSON is ``{"title", "design", "provenance", "rows", "comparisons"}``: the design
    line, where the runs were trained (:func:`provenance_summary`), the rows of `aggregate`
    and the further paired comparisons (:func:`compare`).

    Args:
      rows: output of `aggregate`.
      out_dir: destination directory (created if needed).
      stem: file name without extension.
      title: optional Markdown heading.
      paper: method -> the paper's number (extra column).
      provenance_facts: :func:`provenance_summary` of the runs ({} or None: not recorded).
      compared: output of :func:`compare` (a second table; ``"comparisons"`` in the JSON).

    Returns:
      The paths of the Markdown and JSON files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    notes = [provenance_line(provenance_facts)] if provenance_facts else []
    md.write_text(markdown_table(rows, title=title, paper=paper, notes=notes,
                                 compared=compared))
    js.write_text(json.dumps(json_safe({
        "title": title, "design": design_line(rows), "provenance": provenance_facts or {},
        "rows": list(rows), "comparisons": list(compared)}), indent=2) + "\n")
    return md, js
