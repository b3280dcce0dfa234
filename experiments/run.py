"""Run a sweep (methods x seeds) of one experiment config, then write its table and plot.

Usage (absl flags; ml_collections config_flags for the config and its fields):
    svdcond-run --config=cifar100_dbn --methods=svd,svd+nog+ow+olr --seeds=0,1,2 \
        --workdir=runs/cifar100 [--config.num_epochs=10 --config.data_dir=DIR] \
        [--quick] [--overwrite]
(from a checkout also `python -m experiments.run --config=experiments/configs/...`).
`--config` takes a path or the name of a shipped config; `--help` lists the flags and the
config's fields.

`--config=path.py:arg` passes `arg` to `get_config`; `--quick` selects "runlocal" (a tiny
local run) and writes to `<workdir>_quick`, so a quick sweep never mixes with a full one.
The sweep sets each run's `method` and `seed` itself: `--config.method=m` / `--config.seed=s`
without `--methods` / `--seeds` sweep that method / seed alone, and together with a
`--methods` / `--seeds` that names anything else they are refused.
Multi-process: `--coordinator_address=host:port --num_processes=N --process_id=i` (see
`svdcond_jax.training.distributed`); only process 0 writes tables and plots.

Each run goes to `<workdir>/<method>/seed<k>/` (config.json, metrics.jsonl, TensorBoard
events, checkpoints) through `svdcond_jax.training.loop.train_and_evaluate`. A finished
run is reused only when its stored `config.json` equals the requested config (otherwise
the sweep stops before training anything and names the differing fields; `--overwrite`
retrains); an interrupted one resumes from its checkpoint. Then `<workdir>/table.md`,
`<workdir>/table.json` (the paper's format: mean +- std and min of the validation error
over seeds, failure counts, kappa, compile and training time) and
`<workdir>/conditioning.png` are written.

A config file defines `get_config(arg: str | None = None) -> ConfigDict` and may define
`METHODS`, `SEEDS` (the sweep's defaults), `TITLE`, `WORKDIR` (the default `--workdir`) and
`PAPER` (method -> the paper's number, printed in an extra column) and `COMPARISONS` (pairs
of methods ``(a, b)`` compared like every row with ``svd``, in a second table; pairs whose
rows were not run are left out).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from svdcond_jax.training import runtime
from svdcond_jax.training.config import load_config_file

from . import flags as exp_flags
from . import plot, provenance, tables

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets a (dotted) field that the config already has.

    Raises:
      ValueError: for a key the config does not have.
    """
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise ValueError(f"the config has no field {key!r}")
    node[leaf] = value


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
    for run in plan(config, ".", methods, seeds):
        try:
            validate_config(run.config)
        except ValueError as err:
            raise ValueError(f"run {run.name}: {err}") from None


CONFIG_FILE = "config.json"  # a run's config, written before it trains
PROVENANCE_FILE = tables.PROVENANCE_FILE  # where and with what it trained


def _finished(run_dir: Path) -> bool:
    path = run_dir / tables.METRICS_FILE
    return path.is_file() and bool(tables.load_run(path).summary)


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON (tuples become lists), for storing and comparing."""
    return json.loads(json.dumps(config.to_dict(), default=repr))


def stored_config_difference(run_dir: Path, config: ml_collections.ConfigDict
                             ) -> str | None:
    """Why the run in ``run_dir`` is not a run of ``config``, or None when it is.

    Compares ``run_dir/config.json`` with ``config`` field by field.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return f"{path} is missing (a run of an older version or another tool)"
    stored, wanted = json.loads(path.read_text()), _config_json(config)
    diff = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
    if not diff:
        return None
    return "its config differs in " + ", ".join(
        f"{k} (stored {stored.get(k)!r}, requested {wanted.get(k)!r})" for k in diff)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its config, directory and name."""

    method: str
    seed: int
    fold: int | None  # the validation fold with config.cv_folds >= 2, else None
    config: ml_collections.ConfigDict
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.method}/seed{self.seed}" + (
            "" if self.fold is None else f"/fold{self.fold}")


def plan(config: ml_collections.ConfigDict, workdir: str | Path, methods: Sequence[str],
         seeds: Sequence[int]) -> list[PlannedRun]:
    """Every run of a sweep, in training order (method, then seed, then fold).

    A run is ``<workdir>/<method>/seed<k>/`` with ``method`` and ``seed`` set on a copy of
    ``config``; with ``config.cv_folds = K >= 2`` a seed is K runs
    ``<workdir>/<method>/seed<k>/fold<f>/`` (``cv_fold = f``), so that every validation
    image is validated once per seed.
    """
    folds = int(config.get("cv_folds", 0) or 0)
    runs = []
    for method in methods:
        for seed in seeds:
            for fold in (range(folds) if folds >= 2 else [None]):
                cfg = ml_collections.ConfigDict(config.to_dict())
                cfg.method, cfg.seed = method, int(seed)
                run_dir = Path(workdir) / method / f"seed{seed}"
                if fold is not None:
                    cfg.cv_fold = fold
                    run_dir = run_dir / f"fold{fold}"
                runs.append(PlannedRun(method, int(seed), fold, cfg, run_dir))
    return runs


def check_reuse(config: ml_collections.ConfigDict, workdir: str | Path,
                methods: Sequence[str], seeds: Sequence[int]) -> None:
    """Refuses a sweep whose workdir holds runs (finished or not) of another config.

    Raises:
      ValueError: naming the run and the differing fields.
    """
    for run in plan(config, workdir, methods, seeds):
        seed_dir = run.dir if run.fold is None else run.dir.parent
        if any(seed_dir.glob("fold*")) if run.fold is None else (
                seed_dir / CONFIG_FILE).is_file():
            raise ValueError(
                f"{seed_dir} holds runs of another cross-validation layout (config.cv_folds "
                f"differs). Use another --workdir, or --overwrite to retrain it.")
        if not run.dir.is_dir() or not any(run.dir.iterdir()):
            continue
        why = stored_config_difference(run.dir, run.config)
        if why:
            raise ValueError(
                f"run {run.name} in {workdir} is not a run of the requested "
                f"config: {why}. Use another --workdir, or --overwrite to retrain it.")


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
      Wall time in seconds per run name `<method>/seed<k>` (`<method>/seed<k>/fold<f>`
      with folds; compilation included; 0.0 for a run skipped because it had already
      finished).
    """
    train_fn = train_fn or _default_train_fn()
    check_reuse(config, workdir, methods, seeds)
    walls: dict[str, float] = {}
    runs = plan(config, workdir, methods, seeds)
    for index, run in enumerate(runs, 1):
        name = run.name
        if _finished(run.dir):
            log(f"[{name}] ({index}/{len(runs)}) already finished with this config, reused")
            walls[name] = 0.0
            continue
        if _is_process_0():
            run.dir.mkdir(parents=True, exist_ok=True)
            (run.dir / CONFIG_FILE).write_text(
                json.dumps(_config_json(run.config), indent=1, sort_keys=True) + "\n")
            (run.dir / PROVENANCE_FILE).write_text(
                json.dumps(provenance.collect(), indent=1) + "\n")
        log(f"[{name}] ({index}/{len(runs)}) training")
        start = time.perf_counter()
        summary = train_fn(run.config, str(run.dir))
        walls[name] = time.perf_counter() - start
        if summary.get("complete") is False:
            log(f"[{name}] INCOMPLETE, not a result: {summary.get('history_problem')}; "
                f"delete {run.dir} and rerun it")
            continue
        log(_finished_line(name, summary, walls[name]))
    return walls


def _finished_line(name: str, summary: Mapping[str, Any], wall: float) -> str:
    """The one line printed per finished run."""
    error = summary.get("val_error")
    kappa = summary.get("final_kappa_eps")
    parts = [f"[{name}] done: val_error={'n/a' if error is None else f'{error:.2f}%'}",
             f"failures={summary.get('svd_failures')}",
             f"kappa_eps={'n/a' if kappa is None else f'{kappa:.2e}'}"]
    for key, label in (("compile_time_s", "compile"), ("train_time_s", "train")):
        if summary.get(key) is not None:
            parts.append(f"{label}={summary[key]:.1f}s")
    parts.append(f"wall={wall:.1f}s")
    return " ".join(parts)


def _is_process_0() -> bool:
    import jax

    return jax.process_index() == 0


def report(
    workdir: str | Path,
    methods: Sequence[str] | None = None,
    *,
    title: str | None = None,
    paper: Mapping[str, str] | None = None,
    wall_s: Mapping[str, float] | None = None,
    seeds: Sequence[int] | None = None,
    comparisons: Sequence[tuple[str, str]] = (),
) -> str:
    """Aggregates a sweep, writes table.md / table.json / conditioning.png, returns the table.

    Args:
      workdir: the sweep's root.
      methods: restrict to (and order by) these methods.
      title: table and plot title.
      paper: method -> the paper's number, shown as an extra column.
      wall_s: `<method>/seed<k>` -> wall time; its per-method total is added to the JSON.
      seeds: restrict to these seeds (default: every seed directory found).
      comparisons: pairs ``(a, b)`` of methods compared in a second table
        (:func:`tables.compare`); pairs with a method that has no runs are left out.
    """
    runs = tables.collect_runs(workdir, methods)
    if seeds is not None:
        runs = [r for r in runs if r.seed in set(seeds)]
    rows = tables.aggregate(runs)
    if wall_s:
        for row in rows:
            own = [v for k, v in wall_s.items() if k.rsplit("/seed", 1)[0] == row["method"]]
            row["wall_s"] = sum(own)
    present = {r["method"] for r in rows}
    compared = tables.compare(rows, [(a, b) for a, b in comparisons
                                     if a in present and b in present])
    facts = tables.provenance_summary(runs)
    tables.write_tables(rows, workdir, title=title, paper=paper, provenance_facts=facts,
                        compared=compared)
    try:
        plot.plot_conditioning(runs, Path(workdir) / "conditioning.png", title=title)
    except ValueError as err:  # no conditioning records (e.g. only `bn` runs)
        print(f"no plot: {err}", file=sys.stderr)
    notes = [tables.provenance_line(facts)] if facts else []
    return tables.markdown_table(rows, title=title, paper=paper, notes=notes,
                                 compared=compared)


def define_flags(argv: Sequence[str], *, config_default: str | None = None
                 ) -> flags.FlagValues:
    """The runner's flags (fresh FlagValues; see experiments/flags.py).

    Args:
      argv: the full command line (program name first): config_flags registers the
        `--config.<field>` override flags of the config it names.
      config_default: default of `--config` (None: required).
    """
    fv = exp_flags.new_flag_values()
    try:  # config_flags reads --config.<field> names here: an unknown field raises now
        config_flags.DEFINE_config_file(
            "config", config_default, "config file (path.py, path.py:arg, or the name of a "
            "shipped config such as digits_demo, digits_gcp, cifar100_dbn); override fields "
            "with --config.<field>=value", flag_values=fv, sys_argv=list(argv))
    except (AttributeError, KeyError) as err:
        raise SystemExit(exp_flags.unknown_field_message(
            err, exp_flags.requested_config(argv[1:], config_default))) from None
    flags.DEFINE_list("methods", None, "methods (default: the config's METHODS)",
                      flag_values=fv)
    flags.DEFINE_list("seeds", None, "seeds (default: the config's SEEDS, else 0)",
                      flag_values=fv)
    flags.DEFINE_string("workdir", None, "sweep directory (default: the config's WORKDIR)",
                        flag_values=fv)
    flags.DEFINE_bool("quick", False, "tiny local run (get_config('runlocal')), written to "
                      "<workdir>_quick", flag_values=fv)
    flags.DEFINE_bool("report_only", False, "only aggregate existing runs into the table "
                      "and plot", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "delete the requested runs in the workdir first",
                      flag_values=fv)
    return fv


def parse_flags(argv: Sequence[str], *, config_default: str | None = None,
                doc: str | None = None) -> flags.FlagValues:
    """Defines and parses the runner's flags, then joins the other processes (if any).

    A shipped config's name (``--config=digits_gcp``) is resolved to its path first;
    ``--help`` prints ``doc``, the flags and the config's fields, and exits 0. A process of
    a multi-process run (``--coordinator_address`` ... or ``JAX_*`` variables) whose
    command line is refused here tells the others before it exits
    (``distributed.report_failure``): process 0 then stops every process within seconds,
    naming this one and its error, instead of waiting for it until the timeout.

    Args:
      argv: the arguments without the program name.
      config_default: default of `--config`.
      doc: what ``--help`` prints first.

    Raises:
      SystemExit: a bad command line ("error: ..."), help (code 0), or a failed start.
    """
    argv = exp_flags.resolve_config(argv)
    try:
        fv = define_flags(["prog", *argv], config_default=config_default)
        exp_flags.parse(fv, argv, doc=doc, config_default=config_default)
    except SystemExit as err:
        if isinstance(err.code, str) and _tell_the_other_processes(argv, err.code):
            raise SystemExit(1) from None  # the message is printed already
        raise
    exp_flags.initialize_distributed(fv)  # before any jax computation
    return fv


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a parsed command line asks for."""

    config: ml_collections.ConfigDict
    module: ModuleType
    methods: list[str]
    seeds: list[int]
    workdir: Path
    quick: bool
    report_only: bool
    overwrite: bool


def _sweep_axis(fv: flags.FlagValues, flag: str, field: str, listed: list[Any] | None
                ) -> list[Any] | None:
    """One sweep axis as the command line gives it: ``--<flag>`` and/or ``--config.<field>``.

    The sweep sets ``config.<field>`` of every run itself, from ``--<flag>``, so an override
    of the field is never left to be silently replaced: alone it is the sweep's only value
    (``--config.seed=5`` trains seed 5); with ``--<flag>`` naming just that value it is
    redundant; with any other ``--<flag>`` the two conflict and the command is refused.
    """
    overrides = config_flags.get_override_values(fv["config"])
    if field not in overrides:
        return listed
    value = overrides[field]
    if listed is None or listed == [value]:
        return [value]
    raise SystemExit(
        f"error: --config.{field}={value} conflicts with --{flag}="
        f"{','.join(map(str, listed))}: the sweep sets each run's config.{field} from "
        f"--{flag}; give --{flag} alone (--{flag}={value} for that {field} only)")


def requested_methods(fv: flags.FlagValues) -> list[str] | None:
    """The methods that ``--methods`` and ``--config.method`` ask for; None: neither.

    Raises:
      SystemExit: an empty ``--methods``, or ``--config.method`` that ``--methods`` does
        not name alone (see :func:`_sweep_axis`).
    """
    return _sweep_axis(fv, "methods", "method", exp_flags.str_list("methods", fv.methods))


def requested_seeds(fv: flags.FlagValues) -> list[int] | None:
    """The seeds that ``--seeds`` and ``--config.seed`` ask for; None: neither.

    Raises:
      SystemExit: a bad ``--seeds``, or ``--config.seed`` that ``--seeds`` does not name
        alone (see :func:`_sweep_axis`).
    """
    return _sweep_axis(fv, "seeds", "seed", exp_flags.int_list("seeds", fv.seeds))


def sweep_from_flags(fv: flags.FlagValues) -> Sweep:
    """Resolves parsed flags into a :class:`Sweep` (config, methods, seeds, workdir).

    ``--config.method`` / ``--config.seed`` are the sweep's methods / seeds when
    ``--methods`` / ``--seeds`` are absent (the sweep sets those two fields per run).

    Raises:
      SystemExit: no config, no workdir, an empty method/seed list, a config file
        without `get_config`, or ``--config.method`` / ``--config.seed`` contradicting
        ``--methods`` / ``--seeds``.
    """
    if fv["config"].value is None:
        raise SystemExit("error: --config is required")
    spec = config_flags.get_config_filename(fv["config"])
    try:
        module = load_config_file(spec.partition(":")[0])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    config = fv.config
    if fv.quick:  # get_config("runlocal"), then the command line's --config.<field>s
        config = module.get_config("runlocal")
        for key, value in config_flags.get_override_values(fv["config"]).items():
            set_field(config, key, value)
    methods = requested_methods(fv)
    methods = methods or list(getattr(module, "METHODS", [config.method]))
    seeds = requested_seeds(fv)
    seeds = seeds if seeds is not None else list(getattr(module, "SEEDS", [0]))
    workdir = fv.workdir or getattr(module, "WORKDIR", None)
    if not workdir:
        raise SystemExit("error: --workdir is required (the config defines no WORKDIR)")
    workdir = Path(f"{workdir}_quick") if fv.quick else Path(workdir)
    return Sweep(config, module, methods, seeds, workdir, fv.quick, fv.report_only,
                 fv.overwrite)


def execute(sweep: Sweep, *, log: Callable[[str], None] = print) -> str:
    """Runs (unless report_only), reports and returns the table; process 0 writes it.

    Raises:
      SystemExit: an invalid config for some run, a workdir holding runs of another
        config, or runs whose history is incomplete.
    """
    wall = None
    if not sweep.report_only:
        try:
            validate_sweep(sweep.config, sweep.methods, sweep.seeds)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if sweep.overwrite and _is_process_0():
            for method in sweep.methods:
                for seed in sweep.seeds:  # the seed's folds too
                    shutil.rmtree(sweep.workdir / method / f"seed{seed}", ignore_errors=True)
        try:
            wall = run_sweep(sweep.config, sweep.workdir, sweep.methods, sweep.seeds, log=log)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if not _is_process_0():
        return ""
    title = getattr(sweep.module, "TITLE", None)
    if sweep.quick and title:
        title += " (--quick: a few steps, not a result)"
    table = report(sweep.workdir, sweep.methods, title=title,
                   paper=getattr(sweep.module, "PAPER", None), wall_s=wall, seeds=sweep.seeds,
                   comparisons=getattr(sweep.module, "COMPARISONS", ()))
    log("")
    log(table)
    log(f"wrote {sweep.workdir / 'table.md'}, table.json, conditioning.png")
    incomplete = [f"{r.method}/seed{r.seed}"
                  for r in tables.collect_runs(sweep.workdir, sweep.methods)
                  if r.seed in sweep.seeds and r.summary.get("complete") is False]
    if incomplete:
        raise SystemExit(f"error: incomplete history, left out of the table: "
                         f"{', '.join(incomplete)} (delete those run directories and rerun)")
    return table


def _tell_the_other_processes(argv: Sequence[str], message: str) -> bool:
    """``distributed.report_failure`` with the distributed flags that ``argv`` holds."""
    from svdcond_jax.training import distributed

    fv = exp_flags.new_flag_values()
    try:
        fv(["prog", *argv], known_only=True)
        given = (fv.coordinator_address, fv.num_processes, fv.process_id)
    except flags.Error:  # a bad distributed flag: the environment's values only
        given = (None, None, None)
    return distributed.report_failure(message, *given)


def main(argv: Sequence[str] | None = None, *, config_default: str | None = None,
         doc: str | None = None) -> str:
    """Parses flags, runs the sweep, writes and prints the table; returns it.

    Args:
      argv: the arguments without the program name (default: sys.argv[1:]).
      config_default: default of `--config` (the thin per-experiment entry points).
      doc: what `--help` prints first (default: this module's docstring).
    """
    runtime.configure()  # LAPACK threads, persistent compilation cache (docs/performance.md)
    argv = list(sys.argv[1:] if argv is None else argv)
    return execute(sweep_from_flags(
        parse_flags(argv, config_default=config_default, doc=doc or __doc__)))


def cli() -> None:
    """The ``svdcond-run`` console script."""
    exp_flags.run_app(main)


if __name__ == "__main__":
    cli()
