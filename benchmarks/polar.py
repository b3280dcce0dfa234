"""Accuracy and cost of the polar factors against optax.contrib.muon's Newton-Schulz.

    python -m benchmarks.polar                       # writes benchmarks/results/cpu-polar.{json,md}
    python -m benchmarks.polar --quick --out /tmp/polar   # two tiny shapes (the test suite's)
    python -m benchmarks.polar --update ResNet18 --out benchmarks/results/cpu-polar-resnet18

Per shape and method, on one float32 matrix with i.i.d. N(0, 1) entries (the shapes of
ResNet-18/50 conv kernels reshaped as NOG does, ``(kh*kw*in, out)``, and dense layers):

* ``max|s-1|``: the largest ``|s_j(R) - 1|`` over the ``k`` largest singular values of
  the result, ``k`` the number of input singular values ``>= 3e-3 ||m||_S8`` (the
  non-null space the fast factor claims; ``||m||_S8 >= sigma_max``, see
  ``polar_factor``). ``#below``: how many input singular values lie under that threshold
  (the exact factor sets them to 1 unless they are below its own rank cut, the fast one
  to [0, 1]; they are left out of ``max|s-1|``);
* ``cos``: ``<R, R*>_F / (|R|_F |R*|_F)`` with ``R*`` the float64 rank-aware polar factor;
* time: ``jax.jit``-compiled, after a warm-up call, ``block_until_ready``, over
  ``--repeats`` interleaved rounds (the methods' order rotates every round): min and
  median, and their ratios to optax's routine (``muon``);
* ``products``: matrix products per call (``svd``: none, LAPACK's gesdd).

Methods: ``svd`` and ``newton_schulz`` (exact and converged, ``polar_factor``),
``polar_express`` (``polar_factor(m, method="polar_express")``), and ``muon``
(``optax.contrib._muon.orthogonalize_via_newton_schulz`` with its default coefficients and
5 steps). A second table gives the accuracy with bfloat16 products (float32
accumulation); a CPU emulates bfloat16, so its times would mean nothing and are not taken.

``--update MODEL`` times instead one whole optimizer update of a network of
``svdcond_jax.models`` (random parameters and gradients, every conv/dense kernel but the
head): ``nog_optimizer`` with each polar method, and ``optax.contrib.muon`` on the same
kernels (reshaped as ``(kh*kw*in, out)``), interleaved as above.

Threads: ``main`` applies ``svdcond_jax.training.runtime.configure()`` (one OpenBLAS thread
next to XLA's pool, docs/performance.md). The development machine is shared: read the
ratios and the minima.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdcond_jax.orthogonal import (
    MUON_STEPS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_LOW,
    default_rtol,
    newton_schulz_schedule,
    polar_factor,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu-polar"
METHODS = ("svd", "newton_schulz", "polar_express", "muon")
BASELINE = "muon"
# (name, rows, cols): conv kernels (kh, kw, in, out) as (kh*kw*in, out), dense (in, out).
SHAPES: tuple[tuple[str, int, int], ...] = (
    ("R18 stem 7x7 3->64", 147, 64),
    ("R18 3x3 64->64", 576, 64),
    ("R18 3x3 128->128", 1152, 128),
    ("R18 3x3 256->256", 2304, 256),
    ("R18/R50 3x3 512->512", 4608, 512),
    ("R18 1x1 64->128", 64, 128),
    ("R50 1x1 64->64", 64, 64),
    ("R50 1x1 256->64", 256, 64),
    ("R50 1x1 64->256", 64, 256),
    ("R50 1x1 1024->256", 1024, 256),
    ("R50 1x1 512->2048", 512, 2048),
    ("R18 fc 512->1000", 512, 1000),
    ("R50 fc 2048->1000", 2048, 1000),
    ("dense 1024->1024", 1024, 1024),
)
QUICK_SHAPES = (("3x3 8->8", 72, 8), ("dense 16->24", 16, 24))


def _muon_routine() -> Callable[[jax.Array], jax.Array]:
    from optax.contrib import _muon

    coeffs = jnp.asarray(_muon._DEFAULT_NS_COEFFS)
    return lambda x: _muon.orthogonalize_via_newton_schulz(x, coeffs, MUON_STEPS)


def functions(matmul_dtype: Any = None) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """The methods as jitted ``m -> R`` (``matmul_dtype``: the fast ones only)."""
    if matmul_dtype is not None:
        return {name: jax.jit(lambda x, name=name: polar_factor(x, method=name,
                                                               matmul_dtype=matmul_dtype))
                for name in ("polar_express", "muon")}
    fns = {name: jax.jit(lambda x, name=name: polar_factor(x, method=name))
           for name in ("svd", "newton_schulz", "polar_express")}
    fns["muon"] = jax.jit(_muon_routine())
    return fns


def products(method: str, rows: int, cols: int) -> int | None:
    """Matrix products per call (None: the SVD)."""
    if method == "svd":
        return None
    if method == "newton_schulz":
        _, cubic, snap = newton_schulz_schedule(default_rtol(rows, cols, jnp.float32), None)
        return 7 + 2 * cubic + 3 * snap  # Gram + 6 squarings (the sigma_max bound)
    steps = len(POLAR_EXPRESS_COEFFS) if method == "polar_express" else MUON_STEPS
    return 3 * steps


def accuracy(m: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """``max|s-1|`` on the resolved singular pairs, their complement's size, and ``cos``."""
    m, r = np.asarray(m, np.float64), np.asarray(r, np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    s8 = float(np.sum(s**8) ** (1 / 8))
    resolved = int(np.sum(s >= POLAR_EXPRESS_LOW * s8))
    out = np.linalg.svd(r, compute_uv=False)[:resolved]
    keep = s > default_rtol(*m.shape, np.float32) * s[0]
    exact = (u[:, keep] @ vt[keep]) if keep.any() else np.zeros_like(m)
    cos = float(np.sum(r * exact) / (np.linalg.norm(r) * np.linalg.norm(exact)))
    return {"max_abs_s_minus_1": float(np.abs(out - 1).max()), "below": s.size - resolved,
            "cos": cos}


def time_methods(fns: dict[str, Callable], x: jax.Array, repeats: int) -> dict[str, list[float]]:
    """Seconds per call, interleaved: every round calls each method once, the order
    rotating from round to round."""
    names = list(fns)
    for f in fns.values():
        jax.block_until_ready(f(x))  # compile + warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    for k in range(repeats):
        for n in names[k % len(names):] + names[:k % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(fns[n](x))
            times[n].append(time.perf_counter() - start)
    return times


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (with uncommitted changes)" if dirty else "")


def _cpu() -> str:
    """The host CPU's model name and its widest vector ISA (from /proc/cpuinfo)."""
    name, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines
                     if ln.startswith("model name")), name)
        flags = next((ln for ln in lines if ln.startswith("flags")), "")
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "")
    return f"{name}{', ' + isa if isa else ''}"


def provenance(argv: Sequence[str]) -> dict[str, Any]:
    """Device, CPU, cores, load, date, versions, git revision and the command."""
    import flax
    import jaxlib
    import optax

    dev = jax.devices()[0]
    machine = {"platform": dev.platform, "device_kind": dev.device_kind,
               "host_cpu": _cpu(), "cores": os.cpu_count(), "load_avg": os.getloadavg(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                   "%Y-%m-%d %H:%M UTC")}
    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "optax": optax.__version__}
    return {"machine": machine, "versions": versions, "git": _git_rev(),
            "command": "python -m benchmarks.polar " + " ".join(argv)}


def run(shapes: Sequence[tuple[str, int, int]], repeats: int, seed: int = 0,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measures every shape; returns the rows of both tables."""
    rows, bf16_rows = [], []
    fns, fns_bf16 = functions(), functions(jnp.bfloat16)
    for name, n_rows, n_cols in shapes:
        m = np.random.default_rng(seed).normal(size=(n_rows, n_cols)).astype(np.float32)
        x = jnp.asarray(m)
        times = time_methods(fns, x, repeats)
        base_min, base_med = min(times[BASELINE]), statistics.median(times[BASELINE])
        for method in METHODS:
            t = times[method]
            row = {"shape": name, "rows": n_rows, "cols": n_cols, "method": method,
                   **accuracy(m, fns[method](x)), "time_min_s": min(t),
                   "time_median_s": statistics.median(t), "ratio_min": min(t) / base_min,
                   "ratio_median": statistics.median(t) / base_med,
                   "products": products(method, n_rows, n_cols)}
            rows.append(row)
            log(f"{name} ({n_rows}x{n_cols}) {method}: max|s-1| "
                f"{row['max_abs_s_minus_1']:.2e} cos {row['cos']:.5f} min "
                f"{row['time_min_s'] * 1e3:.1f} ms ({row['ratio_min']:.2f}x muon)")
        for method, f in fns_bf16.items():
            bf16_rows.append({"shape": name, "rows": n_rows, "cols": n_cols,
                              "method": method, **accuracy(m, f(x))})
    return {"rows": rows, "bf16_rows": bf16_rows}


def run_update(model_name: str, repeats: int, seed: int = 0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """One whole optimizer update per method on ``model_name``'s parameters."""
    import optax

    from svdcond_jax import models, nog_mask, nog_optimizer
    from svdcond_jax.training.state import muon_dimension_numbers

    model = getattr(models, model_name)(num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               train=False))["params"]
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, jnp.float32), shapes)
    grads = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
    txs = {f"nog_optimizer {m}": nog_optimizer(0.1, polar_method=m)
           for m in ("svd", "newton_schulz", "polar_express")}
    txs["optax.contrib.muon"] = optax.contrib.muon(
        0.02, muon_weight_dimension_numbers=muon_dimension_numbers)
    fns, compile_s = {}, {}
    for name, tx in txs.items():
        state = tx.init(params)
        update = jax.jit(tx.update)
        start = time.perf_counter()
        jax.block_until_ready(update(grads, state, params))
        compile_s[name] = time.perf_counter() - start
        fns[name] = lambda g, update=update, state=state: update(g, state, params)[0]
    times = time_methods(fns, grads, repeats)
    base = "optax.contrib.muon"
    rows = [{"method": n, "time_min_s": min(t), "time_median_s": statistics.median(t),
             "ratio_min": min(t) / min(times[base]),
             "ratio_median": statistics.median(t) / statistics.median(times[base]),
             "first_call_s": compile_s[n]} for n, t in times.items()]
    for r in rows:
        log(f"{r['method']}: min {r['time_min_s']:.2f} s ({r['ratio_min']:.2f}x muon)")
    kernels = int(sum(jax.tree_util.tree_leaves(nog_mask(params))))
    return {"model": model_name, "kernels": kernels, "update_rows": rows}


def update_markdown(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["versions"]
    lines = [f"### One optimizer update of {report['model']}'s {report['kernels']} "
             "conv/dense kernels (head excluded), float32, CPU", "",
             f"Measured {m['date']} on {m['host_cpu']} ({m['cores']} cores, shared: load "
             f"average {m['load_avg'][0]:.1f} at the start, {report['load_avg_end'][0]:.1f} "
             "at the end); " + ", ".join(f"{k} {val}" for k, val in v.items())
             + f"; git {report['git']}.", "",
             f"Command: `{report['command']}` ({report['repeats']} interleaved rounds; jitted, "
             "the first call (compilation) excluded).", "",
             "| optimizer | min (s) | median (s) | min / muon | median / muon | first call (s) |",
             "|---|---|---|---|---|---|"]
    for r in report["update_rows"]:
        lines.append(f"| {r['method']} | {r['time_min_s']:.2f} | {r['time_median_s']:.2f} | "
                     f"{r['ratio_min']:.2f} | {r['ratio_median']:.2f} | "
                     f"{r['first_call_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (the tables of benchmarks/results/cpu-polar.md)."""
    m, v = report["machine"], report["versions"]
    lines = [
        "### Polar factors: accuracy and cost, float32, CPU", "",
        f"Measured {m['date']} on {m['host_cpu']} ({m['cores']} cores, shared: load average "
        f"{m['load_avg'][0]:.1f} at the start, {report['load_avg_end'][0]:.1f} at the end); "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; git {report['git']}.", "",
        f"Command: `{report['command']}` ({report['repeats']} interleaved rounds per shape).",
        "",
        "Input: one float32 matrix with i.i.d. N(0, 1) entries per shape. `max|s-1|`: over "
        "the k largest singular values of the result, k the number of input singular values"
        " >= 3e-3 ||m||_S8 (`#below`: the others); `cos`: to the "
        "float64 rank-aware polar factor; times in ms (min / median over rounds) and their "
        "ratio to optax.contrib.muon's Newton-Schulz (`muon`); `products`: matrix products "
        "per call.", "",
        "| shape | rows x cols | method | max\\|s-1\\| | #below | cos | min (ms) | "
        "median (ms) | min / muon | median / muon | products |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['shape']} | {r['rows']}x{r['cols']} | {r['method']} | "
            f"{r['max_abs_s_minus_1']:.1e} | {r['below']} | {r['cos']:.5f} | "
            f"{_ms(r['time_min_s'])} | {_ms(r['time_median_s'])} | {r['ratio_min']:.2f} | "
            f"{r['ratio_median']:.2f} | {'–' if r['products'] is None else r['products']} |")
    fast = [r for r in report["rows"] if r["method"] == "polar_express"]
    lines += ["", f"polar_express over the {len(fast)} shapes: max|s-1| <= "
              f"{max(r['max_abs_s_minus_1'] for r in fast):.1e}; time / muon: min ratio "
              f"{min(r['ratio_min'] for r in fast):.2f}-{max(r['ratio_min'] for r in fast):.2f},"
              f" median ratio {min(r['ratio_median'] for r in fast):.2f}-"
              f"{max(r['ratio_median'] for r in fast):.2f}.", "",
              "With bfloat16 products (float32 accumulation; accuracy only, a CPU emulates "
              "bfloat16):", "",
              "| shape | rows x cols | method | max\\|s-1\\| | #below | cos |",
              "|---|---|---|---|---|---|"]
    for r in report["bf16_rows"]:
        lines.append(f"| {r['shape']} | {r['rows']}x{r['cols']} | {r['method']} | "
                     f"{r['max_abs_s_minus_1']:.1e} | {r['below']} | {r['cos']:.5f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per shape")
    parser.add_argument("--quick", action="store_true", help="two tiny shapes, 2 rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="output prefix: writes PREFIX.json and PREFIX.md")
    parser.add_argument("--update", default=None, metavar="MODEL",
                        help="time one whole optimizer update of this svdcond_jax.models "
                             "network instead (e.g. ResNet18)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from svdcond_jax.training import runtime

    runtime.configure()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    report = provenance(argv)
    report["repeats"] = repeats
    if args.update:
        report.update(run_update(args.update, repeats, args.seed))
    else:
        report.update(run(QUICK_SHAPES if args.quick else SHAPES, repeats, args.seed))
    report["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = update_markdown(report) if args.update else markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
