"""The README's main command: the paper's rows that matter, trained offline in minutes.

    python -m experiments.demo                      # decorrelated BN, 8 methods x 3 seeds
    python -m experiments.demo --config=experiments/configs/digits_gcp.py   # GCP (Table 5)
    python -m experiments.demo --quick              # reduced mode (the test suite's)

Both configs train on scikit-learn's embedded digits (offline) with TinyResNet and the
digits' one grey channel; see experiments/configs/digits_demo.py (decorrelated BN: stem
covariance 16x16 of rank <= 9) and digits_gcp.py (covariance pooling: 32x32 covariance
from 16 positions per image, rank <= 15); their docstrings give the measured run times.
Prints one line per finished run (tqdm bar while it trains) and the comparison table
(validation error mean +- std and min over seeds, whether the difference to `svd` is
larger than the seeds' spread, SVD failures, kappa(P + eps*I), the raw covariance's rank,
kappa on its non-zero spectrum, compile and training time), and writes
`<workdir>/table.md`, `table.json` and `conditioning.png`. The default workdir is the
config's WORKDIR (runs/demo, runs/demo_gcp); `--quick` writes to `<workdir>_quick`.
Finished runs whose stored config equals the requested one are reused (`--overwrite`
retrains). Every flag of experiments.run works here (`--methods`, `--seeds`,
`--config.<field>=value`, ...).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from svdcond_jax.training import runtime

from . import flags as exp_flags
from . import run, tables

CONFIG = Path(__file__).resolve().parent / "configs" / "digits_demo.py"


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the demo sweep, prints and returns the Markdown table.

    Args:
      argv: flags without the program name (default: sys.argv[1:]); those of
        experiments.run, with `--config` defaulting to experiments/configs/digits_demo.py.
    """
    runtime.configure()  # LAPACK threads, persistent compilation cache (docs/performance.md)
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = run.parse_flags(argv, config_default=str(CONFIG), doc=__doc__)  # joins processes
    sweep = run.sweep_from_flags(fv)
    if sweep.quick and run.requested_methods(fv) is None:  # neither --methods nor --config.method
        sweep = dataclasses.replace(sweep, methods=list(sweep.module.QUICK_METHODS))
    start = time.perf_counter()
    table = run.execute(sweep)
    total = time.perf_counter() - start
    if table:
        runs = [r for r in tables.collect_runs(sweep.workdir, sweep.methods)
                if r.seed in sweep.seeds]
        compile_s = sum(r.summary.get("compile_time_s") or 0.0 for r in runs)
        train_s = sum(r.summary.get("train_time_s") or 0.0 for r in runs)
        print(f"total wall time {total:.0f} s (runs' compile {compile_s:.0f} s, train "
              f"{train_s:.0f} s, as stored by the runs; reused runs count their own)")
    return table


def cli() -> None:
    """The ``svdcond-demo`` console script."""
    exp_flags.run_app(main)


if __name__ == "__main__":
    cli()
