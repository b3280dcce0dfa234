"""Fault injection: a run survives every single fault, loses nothing, never resumes wrongly.

Each fault is injected for real on small digits runs (TinyResNet, 4 filters, 8x8 images,
8 steps of 16, a checkpoint every 4 steps): bad configs, a split smaller than a batch,
NaN/Inf batches on ordinary and monitor steps, kill -9 of a training subprocess at a
checkpoint, a second concurrent run, truncated / garbage / metadata-less / empty /
bit-flipped newest checkpoints, a checkpoint of another config, a checkpoint of the earlier
optimizer layout, and metrics.jsonl deleted mid-run and after the run finished.

Resume results are compared bit for bit with an uninterrupted run of the same process
(same machine, same compiled programs): exact resume is the claim under test, not a
cross-machine comparison.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import run as run_cli
from experiments import tables
from svdcond_jax.training import checkpointing, input_pipeline, state, writers
from svdcond_jax.training.config import get_config, validate_config
from svdcond_jax.training.loop import train_and_evaluate
from svdcond_jax.training.workdir_lock import WorkdirBusyError

# orbax's reader coroutines of the restores that fail on purpose here complain ("Event loop
# is closed") whenever they are garbage-collected, often during a later test: noise of the
# injected damage, not a failure.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / "experiments" / "configs" / "digits_demo.py"
SMALL = dict(method="svd+nog+olr", num_filters=4, image_size=8, batch_size=16,
             eval_batch_size=16, max_train_examples=64, max_eval_examples=24,
             num_train_steps=8, monitor_every_steps=2, log_every_steps=1,
             lr_boundaries_epochs=[1], progress_bar=False)  # 4 steps per epoch


def _config(**overrides):
    config = get_config()
    config.update({**SMALL, **overrides})
    return config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache shared by this module's runs and its subprocess."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield path
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run: checkpoints 4 and 8, its records and its summary."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = train_and_evaluate(_config(), str(workdir))
    assert summary["complete"] and summary["steps"] == 8
    return workdir


@pytest.fixture(scope="module")
def target():
    """The train state's arrays for this config (the structure checkpoints restore into)."""
    setup = state.create_setup(_config(), num_classes=10, steps_per_epoch=4)
    host = state.create_train_state(jax.random.key(0, impl="rbg"), setup, (8, 8, 3))
    return checkpointing.state_arrays(host), setup


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst


def _assert_same_arrays(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _final_params(workdir: Path):
    return checkpointing.load_arrays(str(workdir), 8)["params"]


def _history(workdir: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["kind"]) for r in writers.read_metrics(str(workdir))]


# ------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "config.batch_size=0: must be an integer >= 1"),
    ("num_train_steps", 0, "config.num_train_steps=0: must be -1 or an integer >= 1"),
    ("learning_rate", -0.1, "config.learning_rate=-0.1: must be a finite number > 0"),
    ("learning_rate", float("nan"), "config.learning_rate=nan"),
    ("max_train_examples", 8, "max_train_examples=8 is smaller than config.batch_size=16"),
    ("max_eval_examples", 0, "config.max_eval_examples=0"),
    ("momentum", 1.0, "config.momentum=1.0: must be a finite number >= 0 and < 1"),
    ("method", "", "config.method='': must be one of bn, svd"),
    ("dataset", "mnist", "config.dataset='mnist'"),
    ("model", "ResNetBlock", "config.model='ResNetBlock': must be a network"),
    ("seed", -1, "config.seed=-1"),
    ("log_every_steps", True, "config.log_every_steps=True"),
    ("batch_size", 16.0, "config.batch_size=16.0"),
    ("lr_boundaries_epochs", [3, 2], "config.lr_boundaries_epochs=[3, 2]"),
    ("dbn_eps", 0.0, "config.dbn_eps=0.0"),
    ("parallel", "pjit", "config.parallel='pjit'"),
])
def test_bad_config_is_rejected_before_any_data_or_compilation(monkeypatch, tmp_path, field,
                                                                value, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("loaded data or built a model before validating the config")

    monkeypatch.setattr(input_pipeline, "load_data", forbidden)
    monkeypatch.setattr(state, "create_train_state", forbidden)
    plain = _config().to_dict()
    plain[field] = value
    with pytest.raises(ValueError, match="invalid config") as err:
        validate_config(plain)
    assert message in str(err.value)
    config = _config()
    try:
        config[field] = value
    except TypeError:  # a ConfigDict already refuses to change a field's type
        return
    with pytest.raises(ValueError, match="invalid config"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written, not even the lock


def test_config_fields_unknown_or_missing_and_every_default_is_valid():
    validate_config(get_config())
    config = get_config().to_dict()
    config["learning_rte"] = 0.1
    del config["seed"]
    with pytest.raises(ValueError) as err:
        validate_config(config)
    assert "config.seed: missing" in str(err.value)
    assert "config.learning_rte=0.1: unknown field" in str(err.value)


def test_split_smaller_than_a_batch_raises_at_setup_instead_of_hanging(monkeypatch, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("built a model for a run that cannot draw a batch")

    monkeypatch.setattr(state, "create_train_state", forbidden)
    config = _config(max_train_examples=-1, batch_size=2048)  # digits: 1,497 train images
    with pytest.raises(ValueError, match="holds 1497 examples .* fewer than one batch"):
        train_and_evaluate(config, str(tmp_path))


def test_runner_rejects_empty_method_or_seed_lists_and_bad_fields(tmp_path, capsys):
    common = [f"--config={DIGITS_CONFIG}:runlocal", f"--workdir={tmp_path}"]
    for flag in ("--methods", "--seeds"):
        with pytest.raises(SystemExit, match=f"{flag}='' names no"):
            run_cli.main([*common, f"{flag}="])
    with pytest.raises(SystemExit, match="config.learning_rate=-0.1") as exit_info:
        run_cli.main([*common, "--methods=svd,bn", "--config.learning_rate=-0.1"])
    assert "run svd/seed0" in str(exit_info.value.code)
    with pytest.raises(SystemExit, match="method='svd\\+typo'"):
        run_cli.main([*common, "--methods=svd,svd+typo"])
    assert not os.listdir(tmp_path)  # validated before the first run started


# ------------------------------------------------------------------------- NaN / Inf batches


def _poison(monkeypatch, steps: dict[int, float]):
    """Makes the training batch of each given (1-based) step hold one NaN/Inf pixel."""
    original = input_pipeline.train_batches

    def poisoned(data, *, batch_size, seed, epoch, start_batch=0, **kw):
        per_epoch = data.train.num_examples // batch_size
        for i, batch in enumerate(original(data, batch_size=batch_size, seed=seed,
                                           epoch=epoch, start_batch=start_batch, **kw)):
            step = epoch * per_epoch + start_batch + i + 1
            if step in steps:
                batch = {**batch, "image": batch["image"].copy()}
                batch["image"][0, 0, 0, 0] = steps[step]
            yield batch

    monkeypatch.setattr(input_pipeline, "train_batches", poisoned)


def test_non_finite_batches_on_ordinary_and_monitor_steps(monkeypatch, tmp_path, cache_dir):
    _poison(monkeypatch, {2: np.nan, 3: np.inf})  # step 2 is a monitor step, 3 is not
    summary = train_and_evaluate(_config(), str(tmp_path))
    assert summary["svd_failures"] == 2 and summary["complete"] and summary["steps"] == 8
    cond = {r["step"]: r for r in writers.read_metrics(str(tmp_path), "conditioning")}
    assert sorted(cond) == [2, 4, 6, 8]
    assert cond[2]["finite"] is False and cond[2]["kappa_eps"] is None and cond[2]["dim"] == 4
    assert all(cond[s]["finite"] and cond[s]["kappa_eps"] > 1 for s in (4, 6, 8))
    train = {r["step"]: r for r in writers.read_metrics(str(tmp_path), "train")}
    assert [train[s]["svd_failures"] for s in range(1, 9)] == [0, 1, 2, 2, 2, 2, 2, 2]
    params = _final_params(tmp_path)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))
    # The skipped steps kept the whole batch_stats, the layers' non-finite counters included
    # (the library counts those steps in svd_failures); the running statistics are finite.
    stats = checkpointing.load_arrays(str(tmp_path), 8)["batch_stats"]
    counters = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(stats)
                if "nonfinite_batches" in jax.tree_util.keystr(path)]
    assert counters == [0]
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(stats))
    assert summary["median_kappa_eps"] is not None and np.isfinite(summary["val_error"])
    (row,) = tables.aggregate([tables.load_run(tmp_path)])
    assert row["num_finished"] == 1 and row["singular_fraction"] is not None


# ------------------------------------------------------------------------- kill -9, 2nd run


def _spawn(config: dict, workdir: Path, cache: str) -> subprocess.Popen:
    code = ("import json, sys\n"
            "from svdcond_jax.training.config import get_config\n"
            "from svdcond_jax.training.loop import train_and_evaluate\n"
            "config = get_config(); config.update(json.loads(sys.argv[1]))\n"
            "train_and_evaluate(config, sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(config), str(workdir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the training subprocess ended (rc {proc.returncode}) before {what}:"
                        f" {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def test_kill_9_at_a_checkpoint_resumes_bit_identically_and_a_second_run_is_refused(
        tmp_path, cache_dir, reference):
    workdir = tmp_path / "run"
    proc = _spawn({**SMALL, "lr_boundaries_epochs": [1]}, workdir, cache_dir)
    lock = workdir / "run.lock"
    _wait_for(lambda: lock.exists() and str(proc.pid) in lock.read_text(), proc, "the lock")
    # a second run into the same workdir fails at once and names the holder
    with pytest.raises(WorkdirBusyError, match=f"held by pid {proc.pid}"):
        train_and_evaluate(_config(), str(workdir))
    # kill -9 while the step-4 checkpoint is being written (or right after it landed)
    ckpts = workdir / "checkpoints"
    _wait_for(lambda: ckpts.is_dir() and any(p.name.startswith("4") for p in ckpts.iterdir()),
              proc, "the first checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()
    # the lock died with the process: the resume takes it, and ends where the reference did
    summary = train_and_evaluate(_config(), str(workdir))
    assert summary["complete"] and summary["history_problem"] is None
    _assert_same_arrays(_final_params(workdir), _final_params(reference))
    assert _history(workdir) == _history(reference)
    ref = writers.read_metrics(str(reference), "summary")[0]
    for key in ("val_error", "best_val_error", "final_kappa_eps", "median_kappa_eps"):
        assert summary[key] == ref[key], key  # same machine and programs: bit-identical


# ------------------------------------------------------------------------- damaged checkpoints


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p))


def _restore_unverified(workdir: Path, arrays, step: int):
    ckpt = checkpointing.Checkpointer(str(workdir))
    try:
        return ckpt.restore(arrays, step)
    finally:
        ckpt.close()


def _flip_a_byte_that_orbax_restores_silently(workdir: Path, arrays, step: int) -> None:
    """Flips one byte of the checkpoint's array data such that orbax restores it without
    error but with different values (the fault that used to go unnoticed)."""
    clean = _restore_unverified(workdir, arrays, step)
    files = sorted(_data_files(workdir / "checkpoints" / str(step)),
                   key=lambda p: -p.stat().st_size)
    for path in files:
        original = path.read_bytes()
        for pos in np.linspace(0, len(original) - 1, 16).astype(int):
            data = bytearray(original)
            data[pos] ^= 0xFF
            path.write_bytes(bytes(data))
            try:
                flipped = _restore_unverified(workdir, arrays, step)
            except Exception:  # noqa: BLE001 (an error is not the silent case we look for)
                continue
            if any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
                    jax.tree_util.tree_leaves(flipped), jax.tree_util.tree_leaves(clean),
                    strict=True)):
                return
        path.write_bytes(original)
    pytest.fail("no single byte flip changed orbax's restored arrays silently")


def _damage(workdir: Path, step: int, mode: str, arrays=None) -> None:
    step_dir = workdir / "checkpoints" / str(step)
    rng = np.random.default_rng(0)
    if mode == "truncated":
        for p in _data_files(step_dir):
            with open(p, "r+b") as f:
                f.truncate(10)
    elif mode == "garbage":
        for p in step_dir.rglob("*"):
            if p.is_file():
                p.write_bytes(rng.integers(0, 256, p.stat().st_size, np.uint8).tobytes())
    elif mode == "metadata_deleted":
        for p in step_dir.rglob("*METADATA"):
            p.unlink()
    elif mode == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif mode == "bit_flipped":
        _flip_a_byte_that_orbax_restores_silently(workdir, arrays, step)
    else:
        raise ValueError(mode)


@pytest.mark.parametrize("mode", ["truncated", "garbage", "metadata_deleted", "empty",
                                  "bit_flipped"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, target,
                                                                  mode, caplog):
    workdir = _copy(reference, tmp_path / "run")
    _damage(workdir, 8, mode, target[0])
    ckpt = checkpointing.Checkpointer(str(workdir))
    with caplog.at_level(logging.WARNING, logger="svdcond_jax.training.checkpointing"):
        restored = checkpointing.restore_latest(ckpt, target[0])
    ckpt.close()
    assert restored.step == 4 and restored.verified
    assert restored.extra["metrics_records"] == 7  # 4 train + 2 conditioning + 1 eval
    _assert_same_arrays(restored.tree, checkpointing.load_arrays(str(reference), 4))
    assert "checkpoint 8" in caplog.text and "damaged" in caplog.text
    assert "falling back to checkpoint 4" in caplog.text
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    assert os.listdir(workdir / checkpointing.DAMAGED_DIR) == ["8"]  # kept for inspection


def test_bit_flipped_checkpoint_resumes_from_the_previous_one_bit_identically(
        tmp_path, reference, target):
    workdir = _copy(reference, tmp_path / "run")
    _damage(workdir, 8, "bit_flipped", target[0])
    summary = train_and_evaluate(_config(), str(workdir))
    assert summary["complete"] and summary["steps"] == 8
    _assert_same_arrays(_final_params(workdir), _final_params(reference))
    assert _history(workdir) == _history(reference)


def test_no_usable_checkpoint_restarts_from_scratch_saying_so(tmp_path, reference, target,
                                                             caplog):
    workdir = _copy(reference, tmp_path / "run")
    for step in (4, 8):
        _damage(workdir, step, "empty")
    ckpt = checkpointing.Checkpointer(str(workdir))
    with caplog.at_level(logging.WARNING, logger="svdcond_jax.training.checkpointing"):
        assert checkpointing.restore_latest(ckpt, target[0]) is None
    ckpt.close()
    assert "no older checkpoint: starting from step 0" in caplog.text


@pytest.mark.parametrize("with_record", [True, False])
def test_checkpoint_of_another_config_is_refused_and_left_in_place(tmp_path, reference,
                                                                   target, with_record):
    workdir = _copy(reference, tmp_path / "run")
    if not with_record:  # as written by an earlier version: orbax's metadata tells instead
        for record in workdir.glob(f"checkpoints/*/{checkpointing.INTEGRITY_FILE}"):
            record.unlink()
    arrays = target[0]
    other = {**arrays, "params": {**arrays["params"], "extra": np.zeros(3, np.float32)}}
    ckpt = checkpointing.Checkpointer(str(workdir))
    with pytest.raises(checkpointing.CheckpointMismatchError, match="another train state"):
        checkpointing.restore_latest(ckpt, other)
    ckpt.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
    assert not (workdir / checkpointing.DAMAGED_DIR).exists()


def test_checkpoint_of_the_earlier_optimizer_layout_resumes_bit_identically(
        tmp_path, reference, target, caplog):
    arrays, setup = target
    saved = _restore_unverified(reference, arrays, 4)  # the current layout
    # the same state as the optimizer before inject_hyperparams stored it (without a record;
    # its schedule count, absent now, is the number of applied updates)
    earlier, _ = state.pre_inject_layout(_config(), setup, arrays)
    now = {jax.tree_util.keystr(p): x for p, x in
           jax.tree_util.tree_leaves_with_path(saved["opt_state"].inner_state)}
    old_opt = jax.tree_util.tree_map_with_path(
        lambda p, x: now.get(jax.tree_util.keystr(p), np.int32(4)), earlier["opt_state"])
    workdir = _copy(reference, tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints")
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
    manager.save(4, args=ocp.args.StandardSave({**saved, "opt_state": old_opt}))
    manager.wait_until_finished()
    manager.close()
    ckpt = checkpointing.Checkpointer(str(workdir))
    restored = checkpointing.restore_latest(
        ckpt, arrays, legacy=state.pre_inject_layout(_config(), setup, arrays))
    ckpt.close()
    assert restored.step == 4 and not restored.verified and restored.extra == {}
    _assert_same_arrays(restored.tree, saved)  # count, learning rate, schedule state too
    with caplog.at_level(logging.WARNING, logger="svdcond_jax.training.checkpointing"):
        summary = train_and_evaluate(_config(), str(workdir))  # trains steps 5-8 from it
    assert "earlier layout, converted" in caplog.text and summary["complete"]
    _assert_same_arrays(_final_params(workdir), _final_params(reference))
    assert _history(workdir) == _history(reference)


def test_checkpoint_past_the_configs_last_step_is_refused(tmp_path, reference):
    workdir = _copy(reference, tmp_path / "run")
    with pytest.raises(ValueError, match="checkpoint at step 8, past this config's last step 6"):
        train_and_evaluate(_config(num_train_steps=6), str(workdir))
    assert _history(workdir) == _history(reference)  # its metrics were left alone


# ------------------------------------------------------------------------- metrics history


def test_metrics_deleted_after_the_run_is_reported_not_a_result(tmp_path, reference, caplog):
    workdir = _copy(reference, tmp_path / "svd+nog+olr" / "seed0")
    (workdir / writers.METRICS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="svdcond_jax.training.loop"):
        summary = train_and_evaluate(_config(), str(workdir))
    assert summary["complete"] is False
    assert "holds 0 of the 14 records this run wrote" in summary["history_problem"]
    assert summary["val_error"] is None and summary["median_kappa_eps"] is None
    assert "not a result" in caplog.text
    (row,) = tables.aggregate(tables.collect_runs(tmp_path))
    assert (row["num_runs"], row["num_finished"], row["num_incomplete"]) == (1, 0, 1)
    assert row["val_error_mean"] is None and row["median_kappa_eps"] is None


def test_metrics_deleted_mid_run_is_detected(monkeypatch, tmp_path, cache_dir):
    workdir = tmp_path / "svd+nog+olr" / "seed0"
    original = input_pipeline.train_batches

    def deleting(data, *, batch_size, seed, epoch, start_batch=0, **kw):
        for i, batch in enumerate(original(data, batch_size=batch_size, seed=seed, epoch=epoch,
                                           start_batch=start_batch, **kw)):
            if epoch == 1 and i == 1:  # while the first steps of epoch 2 run
                (workdir / writers.METRICS_FILE).unlink(missing_ok=True)
            yield batch

    monkeypatch.setattr(input_pipeline, "train_batches", deleting)
    summary = train_and_evaluate(_config(), str(workdir))
    assert summary["complete"] is False and "missing (seq 0-" in summary["history_problem"]
    assert summary["best_val_error"] is None and summary["median_kappa_eps"] is None
    (row,) = tables.aggregate(tables.collect_runs(tmp_path))
    assert row["num_finished"] == 0 and row["num_incomplete"] == 1


# ------------------------------------------------------------------ tampering, keyed records

KEY = b"a secret of this test, kept outside the workdir"


def _record(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / checkpointing.INTEGRITY_FILE)
                      .read_text())


def _rewrite(workdir: Path, trees: dict, *, key: bytes | None) -> None:
    """Replaces checkpoints ``{step: (tree, extra)}`` (newer than every other one kept) by
    their trees with matching records, written by the library itself: what anyone who can
    write the workdir can do (``key`` None), or the run that holds the key."""
    for step in trees:
        shutil.rmtree(workdir / "checkpoints" / str(step))
    ckpt = checkpointing.Checkpointer(str(workdir), key=key)
    for step in sorted(trees):  # orbax saves only steps newer than its latest
        ckpt.save(step, trees[step][0], extra=trees[step][1])
    ckpt.close()


def _keyed_copy(reference: Path, dst: Path, arrays) -> Path:
    """The reference run as a run with ``KEY`` would have written it (keyed records)."""
    workdir = _copy(reference, dst)
    _rewrite(workdir, {step: (_restore_unverified(workdir, arrays, step),
                              _record(workdir, step)["extra"]) for step in (4, 8)}, key=KEY)
    return workdir


def _tampered(workdir: Path, arrays, step: int = 8):
    """Checkpoint ``step`` with other finite weights (params x 1.5) and a matching plain
    record."""
    saved = _restore_unverified(workdir, arrays, step)
    forged = {**saved, "params": jax.tree_util.tree_map(lambda p: p * 1.5, saved["params"])}
    _rewrite(workdir, {step: (forged, _record(workdir, step)["extra"])}, key=None)
    return forged


def _restore(workdir: Path, arrays, key: bytes | None):
    ckpt = checkpointing.Checkpointer(str(workdir), key=key)
    try:
        return checkpointing.restore_latest(ckpt, arrays)
    finally:
        ckpt.close()


def test_tampered_checkpoint_passes_the_plain_digest_and_fails_the_keyed_one(
        tmp_path, reference, target):
    arrays = target[0]
    workdir = _keyed_copy(reference, tmp_path / "run", arrays)
    forged = _tampered(workdir, arrays)
    # Without a key: the rewritten weights restore silently (what a plain digest cannot see).
    silent = _restore(workdir, arrays, key=None)
    assert silent.step == 8 and silent.verified and not silent.authenticated
    _assert_same_arrays(silent.tree, forged)
    # With the key: refused, named, and nothing moved or restored.
    with pytest.raises(checkpointing.CheckpointAuthenticationError,
                       match="checkpoint 8 has no keyed digest"):
        _restore(workdir, arrays, key=KEY)
    # A forger holding another key writes a keyed record: it does not verify either.
    _rewrite(workdir, {8: (forged, _record(workdir, 8)["extra"])}, key=b"another key")
    with pytest.raises(checkpointing.CheckpointAuthenticationError,
                       match="does not verify under this key"):
        _restore(workdir, arrays, key=KEY)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
    assert not (workdir / checkpointing.DAMAGED_DIR).exists()


def test_authenticated_step_content_and_history_count(tmp_path, reference, target):
    arrays = target[0]
    workdir = _keyed_copy(reference, tmp_path / "run", arrays)
    restored = _restore(workdir, arrays, key=KEY)
    assert (restored.step, restored.verified, restored.authenticated) == (8, True, True)
    _assert_same_arrays(restored.tree, checkpointing.load_arrays(str(reference), 8))
    path = workdir / "checkpoints" / "8" / checkpointing.INTEGRITY_FILE
    record = json.loads(path.read_text())
    for forged in ({**record, "extra": {"metrics_records": 3}},  # a shorter history
                   {**record, "step": 4}):  # another step's record
        path.write_text(json.dumps(forged))
        with pytest.raises(checkpointing.CheckpointAuthenticationError, match="does not verify"):
            _restore(workdir, arrays, key=KEY)
    # Checkpoint 4's (authentic) record and arrays moved into step 8's place.
    shutil.rmtree(workdir / "checkpoints" / "8")
    shutil.copytree(workdir / "checkpoints" / "4", workdir / "checkpoints" / "8")
    with pytest.raises(checkpointing.CheckpointAuthenticationError, match="does not verify"):
        _restore(workdir, arrays, key=KEY)


def test_keyed_run_without_a_record_falls_back_and_an_unkeyed_run_warns(
        tmp_path, reference, target, caplog):
    arrays = target[0]
    workdir = _keyed_copy(reference, tmp_path / "run", arrays)
    with caplog.at_level(logging.WARNING, logger="svdcond_jax.training.checkpointing"):
        plain = _restore(workdir, arrays, key=None)  # keyed records, no key set
    assert plain.step == 8 and plain.verified and not plain.authenticated
    assert "saved with a keyed digest, but no key is set" in caplog.text
    # A keyed run never restores a checkpoint without a record (killed between orbax's
    # commit and the record, or the record deleted): moved aside like a damaged one.
    (workdir / "checkpoints" / "8" / checkpointing.INTEGRITY_FILE).unlink()
    restored = _restore(workdir, arrays, key=KEY)
    assert (restored.step, restored.authenticated) == (4, True)
    assert os.listdir(workdir / checkpointing.DAMAGED_DIR) == ["8"]


def test_keyed_run_resumes_bit_identically_and_refuses_an_unkeyed_workdir(
        tmp_path, reference, target, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")  # as `echo` writes it: the newline is not the key
    monkeypatch.setenv(checkpointing.ENV_KEY_FILE, str(key_file))
    workdir = _keyed_copy(reference, tmp_path / "run", target[0])
    shutil.rmtree(workdir / "checkpoints" / "8")
    summary = train_and_evaluate(_config(), str(workdir))  # from keyed checkpoint 4
    assert summary["complete"] and summary["steps"] == 8
    _assert_same_arrays(_final_params(workdir), _final_params(reference))
    assert _history(workdir) == _history(reference)
    assert _restore(workdir, target[0], key=KEY).authenticated  # its new checkpoint 8
    # The same key set for the unkeyed reference run: refused before training, nothing moved.
    unkeyed = _copy(reference, tmp_path / "unkeyed")
    with pytest.raises(checkpointing.CheckpointAuthenticationError, match="no keyed digest"):
        train_and_evaluate(_config(), str(unkeyed))
    assert sorted(os.listdir(unkeyed / "checkpoints")) == ["4", "8"]


def test_checkpoint_key_settings(tmp_path):
    workdir = tmp_path / "run"
    inside, outside, empty = workdir / "key", tmp_path / "key", tmp_path / "empty"
    workdir.mkdir()
    for path in (inside, outside):
        path.write_bytes(b" k3y\n")
    empty.write_bytes(b"\n")
    key = checkpointing.checkpoint_key
    env, env_file = checkpointing.ENV_KEY, checkpointing.ENV_KEY_FILE
    assert key(str(workdir), {}) is None and key(str(workdir), {env: ""}) is None
    assert key(str(workdir), {env: "s"}) == b"s"
    assert key(str(workdir), {env_file: str(outside)}) == b"k3y"
    for settings, match in (({env: "s", env_file: str(outside)}, "both"),
                            ({env_file: str(inside)}, "inside the workdir"),
                            ({env_file: str(empty)}, "is empty"),
                            ({env_file: str(tmp_path / "missing")}, "cannot be read")):
        with pytest.raises(ValueError, match=match):
            key(str(workdir), settings)
