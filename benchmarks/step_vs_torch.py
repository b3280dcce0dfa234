"""Our jitted train step against plain Flax and PyTorch (eager, compile), same machine.

    python -m benchmarks.step_vs_torch                    # the CPU table: batch 32, 2 rows
    python -m benchmarks.step_vs_torch --methods bn --columns ours,torch --rounds 3
    python -m benchmarks.step_vs_torch --device cuda --batch 128   # GPU (torch on cuda)

Before/after in one run (the tree of an older commit with this commit's benchmarks/,
experiments/step_timing.py and svdcond_jax/training/runtime.py copied in):

    git archive 9709628 | tar -x -C /tmp/before
    git archive HEAD benchmarks experiments/step_timing.py \
        svdcond_jax/training/runtime.py | tar -x -C /tmp/before
    python -m benchmarks.step_vs_torch --before /tmp/before

Needs the ``benchmarks`` extra (PyTorch). Rows are method rows (default ``bn``, ``svd``,
``svd+nog+olr``); columns are ``before`` (with ``--before``), ``ours`` (``svdcond_jax``'s
train step as in ``experiments/step_timing.py``), ``flax`` (the plain-Flax baseline,
``benchmarks/flax_resnet.py``, ``bn`` row only), ``torch`` (eager) and ``torch-compile``.
Each (row, column) runs in its own worker process (``benchmarks/worker.py``): the workers
of a row are built one after the other (one compilation at a time), then timed in
``--rounds`` interleaved rounds of ``--steps`` steps each, so that load from other
processes hits every column alike; reported are the median and the minimum wall time per
step, the median process CPU time per step (all threads; robust to a shared machine), the
time from the start of building to the end of the first step ("first step": compilation
included, cold: jax's persistent cache is off and inductor compiles in-process with
``TORCHINDUCTOR_COMPILE_THREADS=1`` into an empty ``TORCHINDUCTOR_CACHE_DIR``), and the
worker's peak RSS. The machine's load average
is recorded before and after each row.

Deterministic: fixed seeds, fixed random batch, the same network and optimizer in every
framework (``benchmarks/torch_resnet.py`` prints the same parameter count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments import provenance

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("before", "ours", "flax", "torch", "torch-compile")
DEFAULT_METHODS = ("bn", "svd", "svd+nog+olr")
LABELS = {"before": "ours before (jit)", "ours": "ours (jit)", "flax": "plain Flax (jit)",
          "torch": "PyTorch eager", "torch-compile": "PyTorch compile"}


class Worker:
    """A ``benchmarks.worker`` subprocess: build on start, ``run(n)`` steps, ``close()``."""

    def __init__(self, column: str, method: str, options: Sequence[str], log_dir: Path,
                 tree: Path = ROOT, compile_threads: int = 1):
        stem = f"{column}-{method.replace('+', '_')}"
        # Cold torch.compile: inductor compiles into an empty cache (by default in-process,
        # one thread, like XLA:CPU's compile on a small machine).
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(compile_threads),
                   PYTHONUNBUFFERED="1",
                   TORCHINDUCTOR_CACHE_DIR=str(log_dir / f"inductor-{stem}"))
        self.log = log_dir / f"{stem}.log"
        self.name = f"{column}/{method}"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker", "--column",
                 "ours" if column == "before" else column, "--method", method, *options],
                cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def run(self, steps: int) -> dict[str, list[float]]:
        """Runs ``steps`` timed steps; returns their wall and CPU times."""
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        """Stops the worker; returns its final report (peak RSS)."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        final = self._read()
        self.proc.wait(timeout=60)
        return final


def columns_for(method: str, columns: Sequence[str]) -> list[str]:
    """The columns a row runs: the plain-Flax baseline exists for ``bn`` only."""
    return [c for c in COLUMNS if c in columns and (c != "flax" or method == "bn")]


def worker_options(args: argparse.Namespace) -> list[str]:
    """Command-line options shared by every worker of a run."""
    return ["--model", args.model, "--batch", str(args.batch), "--image_size",
            str(args.image_size), "--num_classes", str(args.num_classes), "--precision",
            args.precision, "--device", args.device, "--compile_backend",
            args.compile_backend, *(["--cache"] if args.cache else [])]


def run_row(method: str, columns: Sequence[str], args: argparse.Namespace, log_dir: Path,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds a row's workers one at a time, times them in interleaved rounds."""
    load_before = os.getloadavg()
    workers: dict[str, Worker] = {}
    try:
        for column in columns_for(method, columns):
            tree = Path(args.before) if column == "before" else ROOT
            workers[column] = Worker(column, method, worker_options(args), log_dir, tree,
                                     args.compile_threads)
            info = workers[column].info
            log(f"[{method}] {column}: first step after {info['first_step_s']:.1f} s, "
                f"peak RSS {info['rss_peak_mb'] / 1024:.2f} GB")
        times: dict[str, dict[str, list[float]]] = {c: {"wall_s": [], "cpu_s": []}
                                                    for c in workers}
        for r in range(args.rounds):
            for column, worker in workers.items():
                out = worker.run(args.steps)
                for key in times[column]:
                    times[column][key] += out[key]
            log(f"[{method}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{c} {statistics.median(t['wall_s'][-args.steps:]):.2f} s"
                for c, t in times.items()))
        finals = {c: w.close() for c, w in workers.items()}
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    row = {}
    for column, worker in workers.items():
        wall, cpu = times[column]["wall_s"], times[column]["cpu_s"]
        row[column] = {**worker.info, "step_s": statistics.median(wall), "step_min_s": min(wall),
                       "cpu_s": statistics.median(cpu), "wall_s": wall, "cpu_s_all": cpu,
                       "rss_peak_mb": max(worker.info["rss_peak_mb"],
                                          finals[column]["rss_peak_mb"]),
                       "skipped_steps": finals[column].get("skipped")}
    return {"method": method, "columns": row, "load_before": load_before,
            "load_after": os.getloadavg()}


def seconds(x: float) -> str:
    """'2.61 s' or '12.3 ms'."""
    return f"{x:.2f} s" if x >= 1 else f"{1e3 * x:.1f} ms"


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    return f"{seconds(r['step_s'])} (min {seconds(r['step_min_s'])}, CPU {seconds(r['cpu_s'])})"


def _ratio(row: dict[str, Any], a: str, b: str) -> str:
    if a not in row or b not in row:
        return "–"
    return f"{row[a]['step_s'] / row[b]['step_s']:.2f}x"


def format_tables(report: dict[str, Any]) -> str:
    """Markdown: step times per row/column with ratios; first-step times and peak RSS."""
    cols = [c for c in COLUMNS if any(c in r["columns"] for r in report["rows"])]
    facts = report.get("versions") or {}
    where = (f"{report.get('date', '?')}, {report.get('host', {}).get('processor', '?')}, "
             + ", ".join(f"{k} {v}" for k, v in facts.items() if v))
    lines = [f"### {report['header']}", "", f"Measured {where}.", "",
             "| step | " + " | ".join(LABELS[c] for c in cols)
             + (" | before / ours" if "before" in cols else "")
             + " | ours / eager | ours / compile | load (1 min) |",
             "|---" * (len(cols) + 4 + ("before" in cols)) + "|"]
    for row in report["rows"]:
        c = row["columns"]
        load = f"{row['load_before'][0]:.1f} -> {row['load_after'][0]:.1f}"
        speedup = f" | {_ratio(c, 'before', 'ours')}" if "before" in cols else ""
        lines.append(f"| `{row['method']}` | " + " | ".join(_cell(c.get(k)) for k in cols)
                     + f"{speedup} | {_ratio(c, 'ours', 'torch')} | "
                     f"{_ratio(c, 'ours', 'torch-compile')} | {load} |")
    for row in report["rows"]:
        for k, v in row["columns"].items():
            if v.get("skipped_steps"):
                lines.append(f"\n{LABELS[k]} `{row['method']}`: {v['skipped_steps']} of "
                             f"{len(v['wall_s']) + 2} steps had a non-finite gradient and "
                             "were skipped (no update; autograd through eigh at repeated "
                             "eigenvalues).")
    lines += ["", "Time to the first step (s; compilation included, cold) and peak RSS (GB):",
              "", "| step | " + " | ".join(LABELS[c] for c in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for row in report["rows"]:
        c = row["columns"]
        cells = [f"{c[k]['first_step_s']:.1f} s, {c[k]['rss_peak_mb'] / 1024:.2f} GB"
                 if k in c else "–" for k in cols]
        lines.append(f"| `{row['method']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _params(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {f"{c}/{r['method']}": v["params"] for r in rows for c, v in r["columns"].items()
            if v.get("params")}


def run(args: argparse.Namespace, log: Callable[[str], None] = print,
        skip_row: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """Runs every row; returns the report (header, rows, parameter counts, machine).

    ``skip_row(method)``, called before each row, may return a reason not to run it (the
    GPU check's time budget); skipped rows are listed in the report's ``skipped_rows``.
    """
    unknown = [c for c in args.columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; valid: {COLUMNS}")
    if args.before:
        args.columns = ["before", *[c for c in args.columns if c != "before"]]
    elif "before" in args.columns:
        raise ValueError("column 'before' needs --before DIR")
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="step_vs_torch_") as tmp:
        for m in args.methods:
            reason = skip_row(m) if skip_row else None
            if reason:
                log(f"[{m}] skipped: {reason}")
                skipped.append({"method": m, "reason": reason})
                continue
            rows.append(run_row(m, args.columns, args, Path(tmp), log))
    counts = _params(rows)
    header = (f"One train step, {args.model} ({', '.join(sorted(set(map(str, counts.values()))))}"
              f" params), batch {args.batch}, {args.image_size}x{args.image_size}, "
              f"{args.precision}, {args.device} ({os.cpu_count()} cores), median of "
              f"{args.rounds} rounds x {args.steps} steps")
    return {"header": header, "args": vars(args), "rows": rows, "skipped_rows": skipped,
            "params": counts,
            "host": {"machine": platform.machine(), "processor": provenance.cpu_name(),
                     "cores": os.cpu_count()},
            "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def versions() -> dict[str, str | None]:
    """Python, the frameworks' versions and the git revision of this tree ("+dirty")."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    out.update({name: provenance.package_version(name)
                for name in (*provenance.PACKAGES, "torch")})
    out["revision"] = provenance.git_revision(ROOT)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags."""
    # Kept on argparse (not absl.flags): benchmarks/gpu_check.py builds this Namespace from
    # Python (parse_args([...])) and the per-column worker command lines are forwarded as
    # argparse options; no config file, one process.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                        default=list(DEFAULT_METHODS))
    parser.add_argument("--columns", type=lambda s: [c for c in s.split(",") if c],
                        default=[c for c in COLUMNS if c != "before"])
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="add a column 'before': the 'ours' worker run from another "
                             "source tree (an older commit plus this benchmarks/)")
    parser.add_argument("--model", default="CifarResNet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    parser.add_argument("--device", default="cpu", help="torch device (jax uses its default)")
    parser.add_argument("--compile_threads", type=int, default=1,
                        help="inductor's compile threads (TORCHINDUCTOR_COMPILE_THREADS)")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--cache", action="store_true",
                        help="the 'ours' workers use jax's persistent compilation cache "
                             "($SVDCOND_JAX_CACHE_DIR; default: cold compile)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison, prints the Markdown tables, writes JSON; returns the report."""
    from svdcond_jax.training import runtime

    runtime.configure(cache_dir=None)  # the workers compile cold; nothing compiles here
    args = parse_args(argv)
    report = run(args)
    print(format_tables(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
