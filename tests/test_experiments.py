"""Tests of experiments/: tables, plots, configs, the runner and the demo's reduced mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from experiments import flags as exp_flags
from experiments import plot, run, tables
from svdcond_jax.training.config import load_config_file

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def _write_run(
    path: Path, *, method: str, seed: int, val_error: float | None, failures: int = 0,
    kappas: tuple[float, ...] = (1e3, 1e4, 1e5), singular: bool = False, dim: int = 8,
    olr: bool = False,
) -> None:
    """Writes a metrics.jsonl in the loop's schema (contracts.md, D1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, k in enumerate(kappas):
        step = 10 * (i + 1)
        recs.append({"kind": "train", "step": step, "loss": 1.0, "accuracy": 0.5,
                     "learning_rate": 0.1, "olr_eta": (0.05 if i == 0 else 0.1) if olr else None,
                     "svd_failures": 0, "epoch": i})
        recs.append({"kind": "conditioning", "step": step, "kappa_eps": k,
                     "kappa_raw": 1e16 if singular else 3 * k, "lambda_max": 1.0,
                     "kappa_nonzero": 2 * k if singular else 3 * k,
                     "lambda_min": 1.0 / k, "rank": dim - 3 if singular else dim, "dim": dim,
                     "singular": singular, "weight_norm": 1.0 + i, "olr_eta": None})
    if val_error is not None:
        recs.append({"kind": "eval", "step": 30, "loss": 1.0, "accuracy": 0.9,
                     "error": val_error, "epoch": 2})
        recs.append({"kind": "summary", "step": 30, "method": method, "dataset": "digits",
                     "model": "TinyResNet", "seed": seed, "steps": 30, "val_error": val_error,
                     "best_val_error": val_error - 0.5, "final_kappa_eps": kappas[-1],
                     "median_kappa_eps": float(np.median(kappas)),
                     "final_kappa_raw": 1e16 if singular else 3 * kappas[-1],
                     "svd_failures": failures, "train_time_s": 2.0, "steps_per_s": 15.0})
    lines = [json.dumps(r) for r in recs]
    path.write_text("\n".join(lines) + "\n" + '{"kind": "tra')  # + a truncated last line


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two methods x three seeds, one of them unfinished, one singular."""
    errors = {"svd": [20.0, 21.0, 22.5], "svd+nog": [19.0, 18.0, None]}
    for method, errs in errors.items():
        for seed, err in enumerate(errs):
            _write_run(tmp_path / method / f"seed{seed}" / "metrics.jsonl", method=method,
                       seed=seed, val_error=err, failures=seed if method == "svd" else 0,
                       singular=method == "svd", kappas=(1e3 * (seed + 1), 1e6, 1e12),
                       olr=method == "svd+nog")
    return tmp_path


def test_aggregate_mean_std_min(sweep: Path) -> None:
    runs = tables.collect_runs(sweep, ["svd", "svd+nog"])
    assert [(r.method, r.seed) for r in runs] == [
        ("svd", 0), ("svd", 1), ("svd", 2), ("svd+nog", 0), ("svd+nog", 1), ("svd+nog", 2)]
    rows = {r["method"]: r for r in tables.aggregate(runs)}
    svd, nog = rows["svd"], rows["svd+nog"]
    np.testing.assert_allclose(svd["val_error_mean"], np.mean([20.0, 21.0, 22.5]))
    np.testing.assert_allclose(svd["val_error_std"], np.std([20.0, 21.0, 22.5], ddof=1))
    assert svd["val_error_min"] == 20.0 and svd["val_error_max"] == 22.5
    assert svd["failures_total"] == 3 and svd["runs_with_failures"] == 2
    assert svd["singular_fraction"] == 1.0 and (svd["rank"], svd["dim"]) == (5, 8)
    assert (nog["num_runs"], nog["num_finished"]) == (3, 2)  # the unfinished run is counted
    np.testing.assert_allclose(nog["val_error_mean"], 18.5)
    np.testing.assert_allclose(nog["val_error_std"], np.std([19.0, 18.0], ddof=1))
    assert nog["failures_total"] == 0 and nog["singular_fraction"] == 0.0
    np.testing.assert_allclose(nog["final_kappa_eps"], 1e12)
    np.testing.assert_allclose(nog["weight_norm_growth"], 3.0)  # 1 -> 3 over the records
    np.testing.assert_allclose(nog["olr_active_fraction"], 1 / 3)  # eta < lr on 1 of 3
    assert svd["olr_active_fraction"] is None


def test_markdown_and_json_tables(sweep: Path) -> None:
    rows = tables.aggregate(tables.collect_runs(sweep))
    md, js = tables.write_tables(rows, sweep, title="t", paper={"svd": "19.99"})
    text = md.read_text()
    assert "| Val. error (%) mean ± std |" in text
    assert "| svd | 21.17 ± 1.26 | 20.00 | 3 | 3 (2/3 runs) |" in text
    # singular: the rank instead of kappa(P); kappa on the non-zero spectrum instead
    assert "| singular (rank 5/8) | 2.0e+06 |" in text and "| 19.99 |" in text
    assert "| svd+nog | 18.50 ± 0.71 | 18.00 | 2 (2/3 runs) |" in text
    # paired over seeds 0 and 1: d = [19 - 20, 18 - 21]; 2 seeds give no 95% interval
    assert "| -2.00 (no interval: 2 pairs) |" in text
    assert "over 2 / 3 seeds per method" in text
    loaded = json.loads(js.read_text())
    assert loaded["title"] == "t" and "seeds per method" in loaded["design"]
    rows = loaded["rows"]
    assert [r["method"] for r in rows] == ["svd", "svd+nog"]
    assert rows[0]["val_error_min"] == 20.0
    assert rows[0]["final_kappa_raw"] is None and rows[0]["rank"] == 5  # never 1e16
    assert "e+16" not in js.read_text() and "e+15" not in js.read_text()
    assert rows[1]["vs_svd_separable"] is None and rows[1]["vs_svd_pairs"] == 2
    np.testing.assert_allclose(rows[1]["vs_svd_diff"], -2.0)


def test_versus_svd_is_the_paired_difference_with_its_sign_flip_interval() -> None:
    """Paired by run (seed, or seed/fold): every run of svd+x started where svd's did."""
    ref = {"run_errors": {str(s): 2.0 + 0.3 * s for s in range(8)}}
    better = {"run_errors": {str(s): 1.5 + 0.3 * s + 0.05 * (-1) ** s for s in range(8)}}
    v = tables.versus(better, ref)
    assert v["pairs"] == 8 and v["separable"] is True  # every seed better by ~0.5
    np.testing.assert_allclose(v["diff"], -0.5)
    assert v["interval"][0] < -0.5 < v["interval"][1] < 0
    noisy = {"run_errors": {str(s): 2.0 + 0.3 * s + (-1) ** s for s in range(8)}}
    assert tables.versus(noisy, ref)["separable"] is False  # +1, -1, +1, ...: not separable
    few = {"run_errors": {str(s): 1.0 for s in range(5)}}
    assert tables.versus(few, ref)["interval"] is None  # 5 pairs: 2/32 > 0.05
    assert tables.versus(ref, ref)["diff"] is None
    assert tables.versus({"run_errors": {"9": 1.0}}, ref)["pairs"] == 0


def test_comparisons_pair_named_rows_like_versus_svd() -> None:
    """A config's COMPARISONS: error(a) - error(b), paired and tested as each row vs svd."""
    ref = {"method": "b", "run_errors": {str(s): 2.0 + 0.3 * s for s in range(8)}}
    worse = {"method": "a", "run_errors": {str(s): 3.0 + 0.3 * s + 0.05 * (-1) ** s
                                            for s in range(8)}}
    (c,) = tables.compare([ref, worse], [("a", "b")])
    assert c["method"] == "a" and c["versus"] == "b" and c["pairs"] == 8
    np.testing.assert_allclose(c["diff"], 1.0)
    assert c["separable"] is True and 0 < c["interval"][0] < 1.0 < c["interval"][1]
    assert c == {"method": "a", "versus": "b", **tables.versus(worse, ref)}
    text = tables.comparisons_table([c])
    assert "| a − b | +1.00 [" in text and "| yes | 8 |" in text
    few = {"method": "c", "run_errors": {str(s): 1.0 for s in range(5)}}
    (c,) = tables.compare([ref, few], [("c", "b")])
    assert c["interval"] is None and "| – | 5 |" in tables.comparisons_table([c])
    with pytest.raises(ValueError, match=r"comparisons: no row for \['z'\]"):
        tables.compare([ref, worse], [("z", "b")])


def test_folds_pool_into_one_error_per_seed(tmp_path: Path) -> None:
    """k-fold layout: a seed's error is wrong / validated images over its folds."""
    for method, fold_errors in {"svd": [(10.0, 3.0), (20.0, 1.0)],
                                "bn": [(12.0, 3.0), (20.0, None)]}.items():
        for seed, errs in enumerate(fold_errors):
            for fold, err in enumerate(errs):
                path = tmp_path / method / f"seed{seed}" / f"fold{fold}" / "metrics.jsonl"
                _write_run(path, method=method, seed=seed, val_error=err)
                if err is not None:  # fold sizes 300 and 100
                    records = [json.loads(x) for x in path.read_text().splitlines()[:-1]]
                    records[-1].update(cv_folds=2, cv_fold=fold,
                                       val_examples=300 if fold == 0 else 100)
                    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = tables.collect_runs(tmp_path, ["svd", "bn"])
    assert [(r.method, r.seed, r.fold) for r in runs][:4] == [
        ("svd", 0, 0), ("svd", 0, 1), ("svd", 1, 0), ("svd", 1, 1)]
    rows = {r["method"]: r for r in tables.aggregate(runs)}
    np.testing.assert_allclose(rows["svd"]["seed_errors"]["0"], (300 * 10 + 100 * 3) / 400)
    np.testing.assert_allclose(rows["svd"]["seed_errors"]["1"], (300 * 20 + 100 * 1) / 400)
    assert rows["svd"]["val_images"] == 400 and rows["svd"]["num_seeds"] == 2
    assert list(rows["bn"]["seed_errors"]) == ["0"]  # seed 1 lacks a fold's result
    assert rows["bn"]["run_errors"] == {"0/0": 12.0, "0/1": 3.0, "1/0": 20.0}
    assert rows["bn"]["vs_svd_pairs"] == 3  # paired by (seed, fold) run
    text = tables.markdown_table(list(rows.values()))
    assert "validates 400 images (2-fold: every image once per seed)" in text


def test_single_run_shows_plain_error(tmp_path: Path) -> None:
    _write_run(tmp_path / "bn" / "seed0" / "metrics.jsonl", method="bn", seed=0,
               val_error=3.25, kappas=(10.0, 20.0))
    (row,) = tables.aggregate(tables.collect_runs(tmp_path))
    text = tables.markdown_table([row])
    assert "| bn | 3.25 | 3.25 | 1 | 0 | 2.0e+01 | 1.5e+01 | 6.0e+01 | 4.5e+01 | 2.00 |" in text
    assert "mean ± std" not in text  # one seed: no spread to report


def test_collect_runs_rejects_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no"):
        tables.collect_runs(tmp_path)


def test_curve_masks_singular_raw_kappa(sweep: Path) -> None:
    cs = {c.method: c for c in plot.curves(tables.collect_runs(sweep))}
    svd, nog = cs["svd"], cs["svd+nog"]
    assert svd.singular.all() and np.isnan(svd.kappa_raw).all()
    np.testing.assert_allclose(svd.kappa_nonzero, [2 * 2e3, 2e6, 2e12])  # still a curve
    np.testing.assert_allclose(svd.kappa_nonzero_lo, [2e3, 2e6, 2e12])
    assert "raw P singular, rank 5/8" in plot._label(svd)
    np.testing.assert_allclose(nog.kappa_raw, [3 * 2e3, 3e6, 3e12])  # median over 3 seeds
    np.testing.assert_allclose(nog.kappa_eps_lo, [1e3, 1e6, 1e12])
    np.testing.assert_allclose(nog.kappa_eps_hi, [3e3, 1e6, 1e12])
    assert plot._label(nog) == "svd+nog, 3 seeds"


def test_plot_writes_png(sweep: Path, tmp_path: Path) -> None:
    out = plot.plot_conditioning(tables.collect_runs(sweep), tmp_path / "sub" / "k.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_rejects_runs_without_conditioning(tmp_path: Path) -> None:
    path = tmp_path / "bn" / "seed0" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"kind": "summary", "step": 1, "val_error": 1.0}) + "\n")
    with pytest.raises(ValueError, match="conditioning"):
        plot.plot_conditioning(tables.collect_runs(tmp_path), tmp_path / "x.png")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_files_load_and_document_a_command(path: Path) -> None:
    module = load_config_file(path)
    doc = module.__doc__ or ""
    assert "python -m experiments." in doc and "xpected run time" in doc
    for arg in (None, "runlocal"):
        config = module.get_config(arg)
        assert isinstance(config, ml_collections.ConfigDict)
        assert config.method in module.METHODS
    local = module.get_config("runlocal")
    assert 0 < local.num_train_steps <= 10 and local.batch_size <= 32
    from svdcond_jax.training.methods import METHODS, parse_method

    for method in module.METHODS:  # a paper row, optionally @<optimizer>
        parse_method(method)
    assert set(getattr(module, "PAPER", {})) <= set(METHODS)
    for pair in getattr(module, "COMPARISONS", ()):  # named rows of this sweep
        assert len(pair) == 2 and set(pair) <= set(module.METHODS), pair


def _sweep(argv: list[str], config_default: str | None = None) -> run.Sweep:
    fv = run.define_flags(["prog", *argv], config_default=config_default)
    exp_flags.parse(fv, argv)
    return run.sweep_from_flags(fv)


def test_config_flags_override_fields_and_reject_bad_ones(tmp_path: Path) -> None:
    demo_config = str(CONFIG_DIR / "digits_demo.py")
    sweep = _sweep([f"--config={demo_config}", "--config.batch_size=8",
                    "--config.lr_boundaries_epochs=(2, 3)", "--config.data_dir=/d",
                    "--methods=svd,bn", "--seeds=1,2"])
    assert (sweep.config.batch_size, tuple(sweep.config.lr_boundaries_epochs)) == (8, (2, 3))
    assert sweep.config.data_dir == "/d" and sweep.config.num_epochs == 20
    assert (sweep.methods, sweep.seeds, sweep.workdir) == (["svd", "bn"], [1, 2],
                                                           Path("runs/demo"))
    quick = _sweep(["--quick", "--config.batch_size=8", f"--workdir={tmp_path / 'w'}"],
                   config_default=demo_config)
    assert quick.config.num_train_steps == 6 and quick.config.batch_size == 8  # runlocal
    assert quick.workdir == Path(f"{tmp_path / 'w'}_quick")  # never the full sweep's
    for argv, match in ((["--config.bogus=1"], "no field"),
                        (["--config.batch_size=abc"], "batch_size"),
                        (["--seeds=a"], "not integers"), (["--methods="], "names no"),
                        (["--bogus"], "bogus")):
        with pytest.raises(SystemExit, match=match):
            _sweep(argv, config_default=demo_config)
    with pytest.raises(SystemExit, match="--config is required"):
        _sweep(["--workdir=x"])


def test_unknown_config_field_lists_the_valid_ones_and_shipped_names_resolve() -> None:
    with pytest.raises(SystemExit) as info:
        run.parse_flags(["--config=digits_gcp", "--config.batch_sise=3"])
    text = str(info.value)
    assert "no field 'batch_sise'" in text and "did you mean 'batch_size'" in text
    assert "  gcp_dim=32" in text and "  batch_size=128" in text  # digits_gcp's own fields
    fv = run.parse_flags(["--config=digits_gcp:runlocal", "--config.gcp_dim=8"])
    assert fv.config.gcp_dim == 8 and fv.config.task == "gcp"


@pytest.mark.parametrize("entry,argv", [
    ("run", ["--config=digits_demo"]), ("run", []), ("demo", ["--quick"]),
    ("decorrelated_bn", ["--dataset=cifar10"]), ("covariance_pooling", []), ("plot", [])])
@pytest.mark.parametrize("flag", ["--help", "-h", "--helpshort", "--helpfull", "-?"])
def test_help_flags_print_the_flags_and_the_config_fields(entry, argv, flag, capsys) -> None:
    import importlib

    module = importlib.import_module(f"experiments.{entry}")
    with pytest.raises(SystemExit) as info:
        module.main([*argv, flag])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip()[:40]) and "--workdir" in out
    if entry != "plot":
        assert "Config fields" in out and "--config.seed=0" in out


def test_config_method_and_seed_are_the_sweep_or_refused(monkeypatch) -> None:
    # The sweep sets config.method and config.seed per run: an override of either is its
    # only value, redundant with a --methods/--seeds naming just it, else refused.
    demo_config = str(CONFIG_DIR / "digits_demo.py")
    for argv, methods, seeds in (
            (["--config.seed=5"], None, [5]),
            (["--seeds=5", "--config.seed=5"], None, [5]),
            (["--config.method=svd+nog", "--config.seed=2"], ["svd+nog"], [2]),
            (["--methods=bn", "--config.method=bn"], ["bn"], None)):
        sweep = _sweep(argv, config_default=demo_config)
        assert sweep.methods == (methods or ["bn", "svd", "svd+nog", "svd+olr", "svd+ow",
                                             "svd+nog+ow+olr", "newton_schulz"]), argv
        assert sweep.seeds == (seeds or [0, 1, 2, 3]), argv
    for argv, match in (
            (["--seeds=0", "--config.seed=-1"],
             r"--config.seed=-1 conflicts with --seeds=0: the sweep sets each run's "
             r"config.seed from --seeds; give --seeds alone \(--seeds=-1 for that seed only"),
            (["--seeds=5,6", "--config.seed=5"], "--config.seed=5 conflicts with --seeds=5,6"),
            (["--methods=svd", "--config.method=foo"],
             "--config.method=foo conflicts with --methods=svd: .*give --methods alone")):
        with pytest.raises(SystemExit, match=match):
            _sweep(argv, config_default=demo_config)
    # Alone, an unknown method is the sweep's method, and validation names it.
    sweep = _sweep(["--config.method=foo"], config_default=demo_config)
    with pytest.raises(ValueError,
                       match=r"run foo/seed0/fold0: (.|\n)*config.method='foo': must be"):
        run.validate_sweep(sweep.config, sweep.methods, sweep.seeds)
    # The demo's --quick keeps its reduced method list only when no method was asked for.
    from experiments import demo

    asked = []
    monkeypatch.setattr(run, "execute", lambda sweep: asked.append(sweep) or "")
    demo.main(["--quick", "--config.method=svd+nog", "--workdir=/nonexistent/never"])
    demo.main(["--quick", "--workdir=/nonexistent/never"])
    assert [s.methods for s in asked] == [["svd+nog"], ["bn", "svd+nog+olr"]]


def _fake_train(calls: list) -> run.TrainFn:
    def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
        calls.append((config.method, config.seed, workdir))
        _write_run(Path(workdir) / "metrics.jsonl", method=config.method, seed=config.seed,
                   val_error=10.0 + config.seed)
        return {"val_error": 10.0 + config.seed, "svd_failures": 0}

    return train


def test_finished_run_is_reused_only_with_an_equal_config(tmp_path: Path) -> None:
    calls: list = []
    config = ml_collections.ConfigDict({"method": "svd", "seed": 0, "num_train_steps": 6})
    run.run_sweep(config, tmp_path, ["bn"], [0], train_fn=_fake_train(calls),
                  log=lambda _: None)
    stored = json.loads((tmp_path / "bn" / "seed0" / run.CONFIG_FILE).read_text())
    assert stored == {"method": "bn", "seed": 0, "num_train_steps": 6}
    run.run_sweep(config, tmp_path, ["bn"], [0], train_fn=_fake_train(calls),
                  log=lambda _: None)
    assert len(calls) == 1  # same config: reused
    full = ml_collections.ConfigDict({"method": "svd", "seed": 0, "num_train_steps": 440})
    with pytest.raises(ValueError, match=r"num_train_steps \(stored 6, requested 440\)"):
        run.run_sweep(full, tmp_path, ["bn"], [0], train_fn=_fake_train(calls),
                      log=lambda _: None)
    assert len(calls) == 1  # refused before anything trained


def test_run_sweep_calls_train_fn_per_method_and_seed(tmp_path: Path) -> None:
    calls: list = []
    config = ml_collections.ConfigDict({"method": "svd", "seed": 0})
    run.run_sweep(config, tmp_path, ["svd", "svd+nog"], [0, 1], train_fn=_fake_train(calls),
                  log=lambda _: None)
    assert [(m, s) for m, s, _ in calls] == [("svd", 0), ("svd", 1), ("svd+nog", 0),
                                             ("svd+nog", 1)]
    assert calls[3][2] == str(tmp_path / "svd+nog" / "seed1")
    assert config.method == "svd" and config.seed == 0  # the base config is not mutated
    run.run_sweep(config, tmp_path, ["svd"], [0], train_fn=_fake_train(calls),
                  log=lambda _: None)
    assert len(calls) == 4  # finished runs are skipped
    table = run.report(tmp_path, ["svd", "svd+nog"])
    assert "| svd | 10.50 ± 0.71 |" in table
    assert (tmp_path / "conditioning.png").is_file() and (tmp_path / "table.json").is_file()
    assert "| svd | 10.00 |" in run.report(tmp_path, ["svd"], seeds=[0])  # only the sweep's


def test_k_fold_sweeps_run_every_fold_of_every_seed_and_refuse_mixed_layouts(
        tmp_path: Path) -> None:
    config = ml_collections.ConfigDict({"method": "svd", "seed": 0, "cv_folds": 3,
                                        "cv_fold": 0})
    planned = run.plan(config, tmp_path, ["svd"], [4, 5])
    assert [(p.seed, p.fold, p.config.cv_fold) for p in planned] == [
        (4, 0, 0), (4, 1, 1), (4, 2, 2), (5, 0, 0), (5, 1, 1), (5, 2, 2)]
    assert planned[1].dir == tmp_path / "svd" / "seed4" / "fold1"
    assert planned[1].name == "svd/seed4/fold1"
    calls: list = []
    run.run_sweep(config, tmp_path, ["svd"], [4], train_fn=_fake_train(calls),
                  log=lambda _: None)
    assert [c[2] for c in calls] == [str(tmp_path / "svd" / "seed4" / f"fold{f}")
                                     for f in range(3)]
    assert (tmp_path / "svd" / "seed4" / "fold0" / "provenance.json").is_file()
    flat = ml_collections.ConfigDict({"method": "svd", "seed": 0, "cv_folds": 0,
                                      "cv_fold": 0})
    with pytest.raises(ValueError, match="another cross-validation layout"):
        run.run_sweep(flat, tmp_path, ["svd"], [4], train_fn=_fake_train(calls))


def test_demo_reduced_mode_end_to_end(tmp_path: Path, capsys) -> None:
    from experiments import demo

    workdir = tmp_path / "demo"
    table = demo.main(["--quick", "--seeds=0", f"--workdir={workdir}"])  # QUICK_METHODS
    quick = Path(f"{workdir}_quick")
    rows = {r["method"]: r for r in json.loads((quick / "table.json").read_text())["rows"]}
    assert set(rows) == {"bn", "svd+nog+olr"} and not workdir.exists()
    for row in rows.values():
        assert row["num_finished"] == 2 and row["failures_total"] == 0  # 2 folds
        assert row["num_seeds"] == 1 and row["folds"] == 2 and row["val_images"] == 128 * 2
        assert 0.0 <= row["val_error_mean"] <= 100.0
        assert row["final_kappa_eps"] is not None and math.isfinite(row["final_kappa_eps"])
        assert row["rank"] <= 9 and row["dim"] == 16  # one grey channel: 9-dim patches
        assert row["final_kappa_raw"] is None  # singular: null, not 4.5e15
        assert row["median_kappa_nonzero"] is not None
    assert "svd+nog+olr" in table and "(--quick" in table
    out = capsys.readouterr().out
    assert "[bn/seed0/fold1] done: val_error=" in out and "compile=" in out
    assert (quick / "conditioning.png").stat().st_size > 10_000
    # quick then full of one method: the full sweep would not report the 6-step run
    with pytest.raises(SystemExit, match="not a run of the requested config"):
        demo.main(["--seeds=0", "--methods=bn", f"--workdir={quick}"])


def test_step_timing_overheads_and_table() -> None:
    from experiments import step_timing

    results = {"bn": {"fp_ms": 40.0, "step_ms": 100.0, "bp_ms": 60.0},
               "svd": {"fp_ms": 42.0, "step_ms": 102.0, "bp_ms": 60.0},
               "svd+nog+olr": {"fp_ms": 42.0, "step_ms": 104.04, "bp_ms": 62.04},
               "svd+nog+ow+olr": {"fp_ms": 45.0, "step_ms": 107.0, "bp_ms": 62.0}}
    rows = {r["name"]: r for r in step_timing.overheads(results)}
    np.testing.assert_allclose(rows["NOG+OLR over the SVD step"]["overhead_pct"], 2.0)
    np.testing.assert_allclose(rows["NOG+OW+OLR over the SVD step"]["overhead_pct"], 500 / 102)
    np.testing.assert_allclose(rows["SVD layer over plain BN"]["overhead_pct"], 2.0)
    assert [r["meets_target"] for r in rows.values()] == [False, True, True]
    table = step_timing.format_table(results, header="h")
    assert "| svd | 42.0 | 60.0 | 102.0 | 1.050 | 1.000 | 1.020 | 44 / 95 |" in table
    assert "MISSES" in step_timing.format_overheads(list(rows.values()))


def test_conditioning_study_quick_pairs_nog_with_svd(tmp_path: Path) -> None:
    from experiments import conditioning_study

    table = conditioning_study.main(["--quick", "--variants=paper,eps relative",
                                     "--seeds=0", "--methods=svd,svd+nog",
                                     f"--workdir={tmp_path / 'study'}"])
    assert "| paper | svd+nog |" in table and "| eps relative | svd+nog |" in table
    saved = json.loads((tmp_path / "study_quick" / "conditioning_study.json").read_text())
    ratio = saved["results"]["paper"]["svd+nog"]["kappa_eps_vs_svd"]
    assert ratio is not None and ratio["n"] == 1 and ratio["geomean"] > 0
    with pytest.raises(SystemExit, match="unknown"):
        conditioning_study.main(["--variants=nope", f"--workdir={tmp_path}"])
