"""When does NOG lower or raise each condition number? Controlled runs on the digits.

The demo shows NOG raising kappa(P + eps*I) ~40x while lowering kappa on the non-zero
spectrum, with the Pre-SVD weight norm growing ~4x. This study varies one thing at a time
around the demo's recipe (SGD lr 0.1, momentum 0.9, weight decay 5e-4, eps = 1e-2, 220
steps; the paper's recipe shape) and measures, for ``svd``, ``svd+nog`` and
``svd+nog+olr`` on the same seeds (paired: same initial parameters and batches):
kappa(P + eps*I) and kappa on the non-zero spectrum at the end of training, the Pre-SVD
weight norm's growth and the validation error. The variants:

- ``paper``: the demo's recipe;
- ``wd=0``, ``wd=5e-3``, ``wd=5e-2``: weight decay, which pulls the weight norm back;
- ``lr=0.01``: a 10x smaller learning rate (smaller NOG steps);
- ``steps x3``: three times as many epochs (60, decays at 30 and 45);
- ``eps=1e-4``: a 100x smaller eps;
- ``eps relative``: eps scaled by the spectrum, eps * trace(P) / d, so that
  kappa(P + eps I) no longer follows the weights' scale (``config.dbn_eps_relative``).

Command (prints the table; writes <workdir>/conditioning_study.{md,json} and each
variant's sweep under <workdir>/<variant>/):
  svdcond-conditioning-study            (from a checkout: python -m experiments.conditioning_study)
  [--variants=paper,wd=5e-2] [--seeds=0,1,2] [--workdir=runs/conditioning_study] [--quick]

Expected run time: see WALL_NOTE (measured on the 2-core development machine). The
results and the mechanism are in docs/conditioning.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from svdcond_jax.training import runtime

from . import flags as exp_flags
from . import run, tables

METHODS = ("svd", "svd+nog", "svd+nog+olr")
SEEDS = (0, 1, 2)
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "wd=0": {"weight_decay": 0.0},
    "wd=5e-3": {"weight_decay": 5e-3},
    "wd=5e-2": {"weight_decay": 5e-2},
    "lr=0.01": {"learning_rate": 0.01},
    "steps x3": {"num_epochs": 60, "lr_boundaries_epochs": (30, 45)},
    "eps=1e-4": {"dbn_eps": 1e-4},
    "eps relative": {"dbn_eps_relative": True},
}
WORKDIR = "runs/conditioning_study"
WALL_NOTE = ("5 min 22 s elapsed for the 8 variants x 3 methods x 3 seeds (72 runs) on the "
             "2-core development machine (Intel Xeon, AVX-512, quiet), 2026-12-07")
CONFIG = Path(__file__).resolve().parent / "configs" / "digits_demo.py"


def variant_config(name: str, *, quick: bool = False) -> Any:
    """The demo's config (fixed 1,497/300 hold-out, no folds) with variant ``name``."""
    from svdcond_jax.training.config import load_config_file

    config = load_config_file(CONFIG).get_config("runlocal" if quick else None)
    config.cv_folds = 0
    config.progress_bar = False
    for key, value in VARIANTS[name].items():
        config[key] = value
    return config


def _ratio_summary(ratios: Sequence[float]) -> dict[str, float] | None:
    """Geometric mean, min and max of per-seed ratios (None without any)."""
    r = [x for x in ratios if x is not None and np.isfinite(x) and x > 0]
    if not r:
        return None
    return {"geomean": float(np.exp(np.mean(np.log(r)))), "min": float(min(r)),
            "max": float(max(r)), "n": len(r)}


def _final(run_: tables.Run, key: str) -> float | None:
    values = tables._kappas([run_.conditioning[-1].get(key)]) if run_.conditioning else []
    return values[0] if values else None


def summarize(runs: Sequence[tables.Run]) -> dict[str, Any]:
    """Per method: medians over seeds of the final kappas, weight-norm growth and error;
    per NOG method: the per-seed ratios to svd of each final kappa (paired by seed)."""
    by_method: dict[str, dict[int, tables.Run]] = {}
    for r in runs:
        by_method.setdefault(r.method, {})[r.seed] = r
    out: dict[str, Any] = {}
    for method, seeds in by_method.items():
        finals = {k: [_final(r, k) for r in seeds.values()]
                  for k in ("kappa_eps", "kappa_nonzero")}
        growth = [tables._weight_norm_growth(r) for r in seeds.values()]
        errors = [r.summary.get("val_error") for r in seeds.values()]
        med = lambda v: tables._median(tables._finite(v))
        row = {"kappa_eps": med(finals["kappa_eps"]),
               "kappa_nonzero": med(finals["kappa_nonzero"]),
               "weight_norm_growth": med(growth), "val_error": med(errors),
               "seeds": sorted(seeds)}
        ref = by_method.get("svd")
        if ref is not None and method != "svd":
            for key in ("kappa_eps", "kappa_nonzero"):
                ratios = [(_final(r, key) or np.nan) / (_final(ref[s], key) or np.nan)
                          for s, r in seeds.items() if s in ref]
                row[f"{key}_vs_svd"] = _ratio_summary(ratios)
        out[method] = row
    return out


def _fmt_ratio(r: Mapping[str, float] | None) -> str:
    if r is None:
        return "–"
    arrow = "raises" if r["min"] > 1 else "lowers" if r["max"] < 1 else "mixed"
    return f"x{r['geomean']:.2g} [{r['min']:.2g}, {r['max']:.2g}] {arrow}"


def markdown(results: Mapping[str, Mapping[str, Any]], facts: Mapping[str, Any]) -> str:
    """The study's table: one line per variant and method."""
    lines = ["### When NOG lowers or raises each kappa (digits, decorrelated BN)", "",
             "Final values, median over seeds; 'vs svd': per-seed ratio to svd (paired: "
             "same initial parameters and batches), geometric mean [min, max] over seeds; "
             "'raises'/'lowers' only when every seed agrees.",
             tables.provenance_line(facts) if facts else "", "",
             "| variant | method | κ(P+εI) | vs svd | κ nonzero | vs svd | ‖W‖ growth | "
             "val. error (%) |", "|---|---|---|---|---|---|---|---|"]
    for variant, rows in results.items():
        for method, r in rows.items():
            lines.append(
                f"| {variant} | {method} | {tables._fmt_kappa(r['kappa_eps'])} | "
                f"{_fmt_ratio(r.get('kappa_eps_vs_svd'))} | "
                f"{tables._fmt_kappa(r['kappa_nonzero'])} | "
                f"{_fmt_ratio(r.get('kappa_nonzero_vs_svd'))} | "
                f"{tables._fmt(r['weight_norm_growth'])} | {tables._fmt(r['val_error'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the variants (reusing finished runs), prints and returns the table."""
    runtime.configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = exp_flags.new_flag_values()
    flags.DEFINE_list("variants", None, f"subset of {', '.join(VARIANTS)}", flag_values=fv)
    flags.DEFINE_list("seeds", None, "seeds (default 0,1,2)", flag_values=fv)
    flags.DEFINE_list("methods", None, f"methods (default {', '.join(METHODS)})",
                      flag_values=fv)
    flags.DEFINE_string("workdir", WORKDIR, "output directory", flag_values=fv)
    flags.DEFINE_bool("quick", False, "a few steps per run (tests), into <workdir>_quick",
                      flag_values=fv)
    exp_flags.parse(fv, argv, doc=__doc__)
    exp_flags.initialize_distributed(fv)
    variants = exp_flags.str_list("variants", fv.variants) or list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: --variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    seeds = exp_flags.int_list("seeds", fv.seeds) or list(SEEDS)
    methods = exp_flags.str_list("methods", fv.methods) or list(METHODS)
    workdir = Path(f"{fv.workdir}_quick" if fv.quick else fv.workdir)
    results, all_runs = {}, []
    for variant in variants:
        config = variant_config(variant, quick=fv.quick)
        vdir = workdir / variant.replace(" ", "_").replace("=", "")
        try:
            run.validate_sweep(config, methods, seeds)
            run.run_sweep(config, vdir, methods, seeds)
        except ValueError as err:
            raise SystemExit(f"error: variant {variant!r}: {err}") from None
        runs = [r for r in tables.collect_runs(vdir, methods) if r.seed in seeds]
        all_runs += runs
        results[variant] = summarize(runs)
    facts = tables.provenance_summary(all_runs)
    table = markdown(results, facts)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "conditioning_study.md").write_text(table)
    (workdir / "conditioning_study.json").write_text(json.dumps(
        tables.json_safe({"provenance": facts, "variants": VARIANTS, "results": results}),
        indent=2, default=str) + "\n")
    print(table)
    return table


def cli() -> None:
    """The ``svdcond-conditioning-study`` console script."""
    exp_flags.run_app(main)


if __name__ == "__main__":
    cli()
