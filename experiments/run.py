"""Run a sweep (methods x seeds) of one experiment config, then write its table and plot.

Usage:
    python -m experiments.run --config experiments/configs/cifar100_dbn.py \
        --methods svd,svd+nog+ow+olr --seeds 0,1,2 --workdir runs/cifar100 \
        [--set num_epochs=10 --set data_dir=/data/tfds] [--quick]

(`--config.data_dir=/data/tfds`, ml_collections' spelling, is accepted as `--set` too.)

Each run goes to `<workdir>/<method>/seed<k>/` (metrics.jsonl, TensorBoard events,
checkpoints) through `svdcond_jax.training.loop.train_and_evaluate`; a run whose
metrics.jsonl already holds a summary is skipped, and an interrupted one resumes from its
checkpoint. Then `<workdir>/table.md`, `<workdir>/table.json` (the paper's format: mean
+- std and min of the validation error over seeds, failure counts, kappa) and
`<workdir>/conditioning.png` (log-scale kappa vs step per method) are written.

A config file defines `get_config(arg: str | None = None) -> ConfigDict` ("runlocal" as
`arg` gives a tiny local run; `--quick` or `path.py:runlocal` selects it) and may define
`METHODS`, `SEEDS` (the sweep's defaults) and `PAPER` (method -> the paper's number,
printed in an extra column).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from experiments import plot, tables
from svdcond_jax.training import runtime

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


def load_config_module(path: str | Path) -> ModuleType:
    """Imports a config file by path (as ml_collections' config_flags does).

    Args:
      path: a Python file defining `get_config`.

    Returns:
      The module.

    Raises:
      ValueError: if the file does not exist or defines no `get_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r} is not a file")
    spec = importlib.util.spec_from_file_location(f"_experiment_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config={str(path)!r} defines no get_config()")
    return module


def load_config(spec: str, *, quick: bool = False) -> tuple[ml_collections.ConfigDict, ModuleType]:
    """Loads `path.py` or `path.py:arg` (big_vision style); `quick` forces arg "runlocal".

    Returns:
      The config and its module (for METHODS / SEEDS / PAPER).
    """
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    arg = "runlocal" if quick else (arg or None)
    return module.get_config(arg), module


def parse_value(text: str) -> Any:
    """Parses a `--set` value as a Python literal, else keeps it as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `key=value` (dotted keys allowed) overrides in place.

    Raises:
      ValueError: for an item without '=' or a key the config does not have.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        *parents, leaf = key.strip().split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--set {item!r}: the config has no field {key!r}")
        node[leaf] = parse_value(value.strip())


def validate_sweep(config: ml_collections.ConfigDict, methods: Sequence[str],
                   seeds: Sequence[int]) -> None:
    """Validates every run's config of a sweep before the first run loads or compiles.

    Raises:
      ValueError: no method or no seed, or an invalid config field (the message names the
        run, the field and its value; see `svdcond_jax.training.config.validate_config`).
    """
    from svdcond_jax.training.config import validate_config

    if not methods or not seeds:
        raise ValueError(f"nothing to run: methods={list(methods)}, seeds={list(seeds)}")
    for method in methods:
        for seed in seeds:
            cfg = ml_collections.ConfigDict(config.to_dict())
            cfg.method, cfg.seed = method, seed
            try:
                validate_config(cfg)
            except ValueError as err:
                raise ValueError(f"run {method}/seed{seed}: {err}") from None


def _finished(run_dir: Path) -> bool:
    path = run_dir / tables.METRICS_FILE
    return path.is_file() and bool(tables.load_run(path).summary)


def _default_train_fn() -> TrainFn:
    from svdcond_jax.training.loop import train_and_evaluate

    return train_and_evaluate


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    train_fn: TrainFn | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Trains every method x seed into `<workdir>/<method>/seed<k>/`.

    Args:
      config: the base config; `method` and `seed` are set per run on a copy.
      workdir: the sweep's root.
      methods: method names (svdcond_jax.training.methods.METHODS).
      seeds: seeds.
      train_fn: `train_and_evaluate(config, workdir) -> summary` (default: D1's loop).
      log: where progress lines go.

    Returns:
      Wall time in seconds per run directory name `<method>/seed<k>` (compilation
      included; 0.0 for a run skipped because it had already finished).
    """
    train_fn = train_fn or _default_train_fn()
    walls: dict[str, float] = {}
    for method in methods:
        for seed in seeds:
            name = f"{method}/seed{seed}"
            run_dir = Path(workdir) / method / f"seed{seed}"
            if _finished(run_dir):
                log(f"[{name}] already finished, skipped")
                walls[name] = 0.0
                continue
            cfg = ml_collections.ConfigDict(config.to_dict())
            cfg.method, cfg.seed = method, int(seed)
            start = time.perf_counter()
            summary = train_fn(cfg, str(run_dir))
            walls[name] = time.perf_counter() - start
            if summary.get("complete") is False:
                log(f"[{name}] INCOMPLETE, not a result: {summary.get('history_problem')}; "
                    f"delete {run_dir} and rerun it")
                continue
            error = summary.get("val_error")
            error_text = "n/a" if error is None else f"{error:.2f}%"
            log(f"[{name}] val_error={error_text} "
                f"failures={summary.get('svd_failures')} wall={walls[name]:.0f}s")
    return walls


def report(
    workdir: str | Path,
    methods: Sequence[str] | None = None,
    *,
    title: str | None = None,
    paper: Mapping[str, str] | None = None,
    wall_s: Mapping[str, float] | None = None,
) -> str:
    """Aggregates a sweep, writes table.md / table.json / conditioning.png, returns the table.

    Args:
      workdir: the sweep's root.
      methods: restrict to (and order by) these methods.
      title: table and plot title.
      paper: method -> the paper's number, shown as an extra column.
      wall_s: `<method>/seed<k>` -> wall time; its per-method total is added to the JSON.
    """
    runs = tables.collect_runs(workdir, methods)
    rows = tables.aggregate(runs)
    if wall_s:
        for row in rows:
            own = [v for k, v in wall_s.items() if k.rsplit("/seed", 1)[0] == row["method"]]
            row["wall_s"] = sum(own)
    tables.write_tables(rows, workdir, title=title, paper=paper)
    try:
        plot.plot_conditioning(runs, Path(workdir) / "conditioning.png", title=title)
    except ValueError as err:  # no conditioning records (e.g. only `bn` runs)
        print(f"no plot: {err}", file=sys.stderr)
    return tables.markdown_table(rows, title=title, paper=paper)


def _int_list(text: str) -> list[int]:
    values = [int(s) for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no seed")
    return values


def _str_list(text: str) -> list[str]:
    values = [s.strip() for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no method")
    return values


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The runner's flags (shared with the thin per-experiment entry points)."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    parser.add_argument("--methods", type=_str_list, default=None,
                        help="comma-separated method names (default: the config's METHODS)")
    parser.add_argument("--seeds", type=_int_list, default=None,
                        help="comma-separated seeds (default: the config's SEEDS, else 0)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny local run (arg 'runlocal')")
    parser.add_argument("--report_only", action="store_true",
                        help="only aggregate existing runs into the table and plot")
    return parser


def config_flag_overrides(extra: Sequence[str]) -> list[str]:
    """Turns ml_collections-style `--config.key=value` / `--config.key value` into `key=value`.

    Raises:
      ValueError: for any other unrecognised argument.
    """
    out, items = [], list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--config."):
            raise ValueError(f"unrecognised argument {item!r}")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            if not items:
                raise ValueError(f"{item!r} needs a value")
            value = items.pop(0)
        out.append(f"{key}={value}")
    return out


def main(argv: Sequence[str] | None = None, *, parser: argparse.ArgumentParser | None = None
         ) -> str:
    """Parses flags, runs the sweep, writes and prints the table; returns it."""
    runtime.configure()  # LAPACK threads, persistent compilation cache (docs/performance.md)
    args, extra = (parser or build_parser()).parse_known_args(argv)
    config, module = load_config(args.config, quick=args.quick)
    apply_overrides(config, [*args.overrides, *config_flag_overrides(extra)])
    methods = args.methods or list(getattr(module, "METHODS", [config.method]))
    seeds = args.seeds if args.seeds is not None else list(getattr(module, "SEEDS", [0]))
    wall = None
    if not args.report_only:
        try:
            validate_sweep(config, methods, seeds)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        wall = run_sweep(config, args.workdir, methods, seeds)
    title = getattr(module, "TITLE", None)
    table = report(args.workdir, methods, title=title, paper=getattr(module, "PAPER", None),
                   wall_s=wall)
    print(table)
    print(f"wrote {Path(args.workdir) / 'table.md'}, table.json, conditioning.png")
    incomplete = [f"{r.method}/seed{r.seed}" for r in tables.collect_runs(args.workdir, methods)
                  if r.summary.get("complete") is False]
    if incomplete:
        raise SystemExit(f"error: incomplete history, left out of the table: "
                         f"{', '.join(incomplete)} (delete those run directories and rerun)")
    return table


if __name__ == "__main__":
    main()
