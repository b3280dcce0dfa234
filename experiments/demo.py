"""The README's main command: every paper row that matters, trained offline in minutes.

    python -m experiments.demo                 # ~6 min on 2 CPU cores (measured 361 s)
    python -m experiments.demo --quick         # reduced mode (19 s, the test suite's)

Trains bn, svd, svd_autodiff, svd+nog, svd+olr, svd+ow, svd+nog+ow+olr and newton_schulz
on scikit-learn's embedded digits with TinyResNet whose stem is followed by decorrelated BN
(config: experiments/configs/digits_demo.py), then prints a comparison table (validation
error, final and median kappa(P + eps*I), the raw covariance's status, SVD failures,
training and wall time) and writes `<workdir>/table.md`, `table.json` and the conditioning
plot `conditioning.png`. Runs already finished in the workdir are reused (pass
`--overwrite` to retrain them).
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from experiments import run
from svdcond_jax.training import runtime

CONFIG = Path(__file__).resolve().parent / "configs" / "digits_demo.py"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The demo's flags (all optional)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--quick", action="store_true",
                        help="reduced mode: a few steps of QUICK_METHODS (about a minute)")
    parser.add_argument("--methods", type=run._str_list, default=None,
                        help="comma-separated subset (default: the config's METHODS)")
    parser.add_argument("--seeds", type=run._int_list, default=None, help="default: 0")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the methods' previous runs in the workdir first")
    args, extra = parser.parse_known_args(argv)
    args.overrides += run.config_flag_overrides(extra)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the demo sweep, prints and returns the Markdown table."""
    runtime.configure()  # LAPACK threads, persistent compilation cache (docs/performance.md)
    args = parse_args(argv)
    config, module = run.load_config(str(CONFIG), quick=args.quick)
    run.apply_overrides(config, args.overrides)
    methods = args.methods or list(module.QUICK_METHODS if args.quick else module.METHODS)
    seeds = args.seeds if args.seeds is not None else list(module.SEEDS)
    if args.overwrite:
        for method in methods:
            shutil.rmtree(Path(args.workdir) / method, ignore_errors=True)
    start = time.perf_counter()
    wall = run.run_sweep(config, args.workdir, methods, seeds)
    table = run.report(args.workdir, methods, title=module.TITLE, wall_s=wall)
    total = time.perf_counter() - start
    print()
    print(table)
    print(f"total wall time {total:.0f} s; wrote {args.workdir}/table.md, table.json, "
          "conditioning.png")
    return table


if __name__ == "__main__":
    main()
