"""Several processes on jax.distributed, for real: two local processes (experiments/launch.py).

Claims (docs/distributed.md): for in-memory data, 2 processes x 1 device train exactly the
global batches of 1 process x 2 devices, so parameters and metrics agree to round-off;
metrics are written once; checkpoints restore across layouts in both directions (and verify
against the SHA-256 written by the other layout); a killed process makes the others exit
(bounded, no hang) and the run resumes in one process; ``pmap`` is refused with several
processes; the launcher propagates the first failure and prefixes output lines.

Every subprocess runs in its own process group and is killed in ``finally``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import launch
from svdcond_jax.training import checkpointing, input_pipeline, loop, steps, writers
from svdcond_jax.training.state import create_setup, create_train_state
from tests._dist_worker import tiny_config

pytestmark = pytest.mark.slow
WORKER = "tests._dist_worker"
LAUNCH_TIMEOUT_S = 240  # a bound against hangs, not a speed target


def _launch(*args: str, processes: int = 2) -> tuple[int, str]:
    out = io.StringIO()
    code = launch.launch([WORKER, *args], processes=processes, timeout_s=LAUNCH_TIMEOUT_S,
                         out=out)
    return code, out.getvalue()


def _assert_close(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.inexact):  # round-off of a float32 reduction order
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(x, y)


def _records(workdir: str) -> list[dict]:
    return writers.read_metrics(workdir)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs, in and out of process."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs,
                os.environ.get("SVDCOND_JAX_CACHE_DIR"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    os.environ["SVDCOND_JAX_CACHE_DIR"] = path  # the workers' runtime.enable_compilation_cache
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    if previous[2] is None:
        os.environ.pop("SVDCOND_JAX_CACHE_DIR", None)
    else:
        os.environ["SVDCOND_JAX_CACHE_DIR"] = previous[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 2 devices (this process): ``one`` to 4 steps (checkpoints 2 and 4);
    ``resumed`` holds its step-2 checkpoint and is continued to 4 steps by 2 processes,
    which also train ``two`` from scratch to 4 steps."""
    root = tmp_path_factory.mktemp("dist")
    one, two, resumed = (str(root / name) for name in ("one", "two", "resumed"))
    assert jax.process_count() == 1 and jax.device_count() == 2
    loop.train_and_evaluate(tiny_config(2), one)
    shutil.copytree(one, resumed)
    loop.train_and_evaluate(tiny_config(4), one)
    code, out = _launch(two, "4", resumed, "4")
    assert code == 0, out[-4000:]
    return {"root": root, "one": one, "two": two, "resumed": resumed, "out": out}


def _done_lines(out: str, workdir: str) -> dict[str, str]:
    return {line[:4]: line[5:] for line in out.splitlines() if f"DONE {workdir} " in line}


def test_two_processes_equal_one_process_with_two_devices(runs):
    done = _done_lines(runs["out"], runs["two"])
    assert done["[p0]"].startswith(f"DONE {runs['two']} 4 ")
    assert done["[p1]"] == done["[p0]"]  # every process returns process 0's summary
    for step in (2, 4):
        _assert_close(checkpointing.load_arrays(runs["two"], step),
                      checkpointing.load_arrays(runs["one"], step))


def test_metrics_are_written_once_and_equal_one_process(runs):
    one, two = _records(runs["one"]), _records(runs["two"])
    assert [r["seq"] for r in two] == list(range(len(two)))  # one writer, no duplicates
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "accuracy", "error", "kappa_eps", "weight_norm", "olr_eta"):
            if a.get(key) is not None:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert two[-1]["kind"] == "summary" and two[-1]["complete"]
    assert len(os.listdir(os.path.join(runs["two"], "tensorboard"))) == 1


def test_one_process_checkpoint_resumes_in_two_processes(runs):
    _assert_close(checkpointing.load_arrays(runs["resumed"], 4),
                  checkpointing.load_arrays(runs["one"], 4))
    assert [(r["kind"], r["step"]) for r in _records(runs["resumed"])] == [
        (r["kind"], r["step"]) for r in _records(runs["one"])]


def test_two_process_checkpoint_verifies_and_evaluates_in_one_process(runs):
    config = tiny_config(4)
    data = input_pipeline.load_data(config)
    setup = create_setup(config, num_classes=data.num_classes,
                         steps_per_epoch=data.train.train_steps(config.batch_size),
                         axis_name=None)
    host = create_train_state(jax.random.key(config.seed, impl=config.prng_impl), setup,
                              (data.image_size, data.image_size, 3))
    ckpt = checkpointing.Checkpointer(runs["two"])
    try:
        state, restored = checkpointing.restore_state(ckpt, host)
    finally:
        ckpt.close()
    assert restored is not None and restored.step == 4
    assert restored.verified  # the SHA-256 written by 2 processes matches 1 process's read
    par = steps.make_parallel("jit", ol_coeff=setup.ol_coeff, ol_pattern=setup.pre_svd_pattern,
                              capture_stem=False)
    ev = loop.evaluate(config, data, par, par.place_state(state))
    last = [r for r in _records(runs["two"]) if r["kind"] == "eval"][-1]
    np.testing.assert_allclose(ev["loss"], last["loss"], rtol=1e-5)
    assert ev["accuracy"] == pytest.approx(last["accuracy"])


def _start(workdir: str, address: str, index: int, log: str) -> subprocess.Popen:
    env = launch.process_env(os.environ, address, 2, index, 1)
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", WORKER, workdir, "4",
                                 "--sleep_after_step", "1"], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def test_killed_process_ends_the_run_and_it_resumes_in_one_process(runs):
    workdir, root = str(runs["root"] / "killed"), runs["root"]
    address = f"127.0.0.1:{launch.free_port()}"
    procs = [_start(workdir, address, i, str(root / f"killed{i}.log")) for i in range(2)]
    try:
        record = os.path.join(workdir, "checkpoints", "2", checkpointing.INTEGRITY_FILE)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not os.path.exists(record):
            assert procs[0].poll() is None, (root / "killed0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint 2"
            time.sleep(0.1)
        os.killpg(procs[1].pid, signal.SIGKILL)
        # The survivor fails its next collective (or its heartbeat check): it must end, with
        # an error, instead of waiting forever.
        assert procs[0].wait(timeout=120) != 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    summary = loop.train_and_evaluate(tiny_config(4), workdir)  # 1 process x 2 devices
    assert summary["steps"] == 4
    _assert_close(checkpointing.load_arrays(workdir, 4),
                  checkpointing.load_arrays(runs["one"], 4))


def test_tfds_shares_run_in_two_processes(tmp_path):
    # Each process reads its own (mocked) files; the share sizes are all-gathered at start-up
    # so that both run the same number of train and eval steps (a mismatch would hang).
    workdir = str(tmp_path / "tfds")
    code, out = _launch(workdir, "2", "--mock_tfds", "7", "--set", 'dataset="cifar10"',
                        "--set", "image_size=8", "--set", "max_train_examples=-1",
                        "--set", "max_eval_examples=-1", "--set", "batch_size=4",
                        "--set", "eval_batch_size=4")
    assert code == 0, out[-4000:]
    assert f"[p0] DONE {workdir} 2" in out and f"[p1] DONE {workdir} 2" in out
    records = _records(workdir)
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[-1]["kind"] == "summary" and records[-1]["steps"] == 2


def test_launcher_stops_all_on_the_first_failure():
    code, out = _launch("--fail_process", "1")
    assert code == 1, out[-3000:]
    assert "[p1] RuntimeError: process 1 fails on purpose" in out
    # Process 0 may fail in the same instant (its collective lost its peer): both listed.
    assert re.search(r"\[launch\] exit code 1 \(process\(es\) \[(0, )?1\]\)", out), out[-3000:]


def test_launcher_environment():
    env = launch.process_env({"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=2",
                              "X": "y"}, "127.0.0.1:5", 3, 2, 4)
    assert env["X"] == "y" and env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:5"
    assert env["JAX_NUM_PROCESSES"] == "3" and env["JAX_PROCESS_ID"] == "2"
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=4"
    with pytest.raises(ValueError, match="processes=0"):
        launch.launch([WORKER], processes=0)


def test_pmap_is_refused_with_several_processes(monkeypatch):
    steps.check_mode("pmap")  # one process: fine
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"config.parallel='pmap'.*config.parallel='jit'"):
        steps.check_mode("pmap")
    steps.check_mode("jit")
    config = tiny_config(2)
    config.parallel = "pmap"
    with pytest.raises(ValueError, match="config.parallel='pmap'"):
        loop.train_and_evaluate(config, "/nonexistent/never/created")


def _as_process(monkeypatch, index: int, count: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


@pytest.mark.parametrize("count", [2, 3])
def test_in_memory_shares_are_the_rows_of_the_one_process_batches(monkeypatch, count):
    config = tiny_config(2)
    config.max_train_examples, config.max_eval_examples = 100, 50
    data = input_pipeline.load_data(config)
    per_process, kw = 8, {"seed": 5, "epoch": 1, "start_batch": 1}
    whole = list(input_pipeline.train_batches(data, batch_size=per_process * count, **kw))
    evals = list(input_pipeline.eval_batches(data, batch_size=per_process * count))
    shares, eval_shares = [], []
    for p in range(count):
        _as_process(monkeypatch, p, count)
        shares.append(list(input_pipeline.train_batches(data, batch_size=per_process, **kw)))
        eval_shares.append(list(input_pipeline.eval_batches(data, batch_size=per_process)))
    monkeypatch.undo()
    assert len(whole) == 100 // (per_process * count) - 1 > 0
    for p in range(count):
        assert len(shares[p]) == len(whole) and len(eval_shares[p]) == len(evals)
    for b, batch in enumerate(whole):  # global batch = the processes' rows, in order
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([shares[p][b][key] for p in range(count)]), batch[key])
    for b, batch in enumerate(evals):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(
                np.concatenate([eval_shares[p][b][key] for p in range(count)]), batch[key])
    assert sum(float(s["mask"].sum()) for share in eval_shares for s in share) == 50


def test_file_shares_pad_evaluation_to_the_largest_share(monkeypatch):
    config = tiny_config(2)
    config.max_eval_examples = 20
    data = input_pipeline.load_data(config)
    # As if this process read 20 examples of its files and another one 37.
    split = input_pipeline.Split(**{**data.eval.__dict__, "global_rows": False,
                                    "min_share": 20, "max_share": 37})
    data = input_pipeline.Data(data.train, split, data.num_classes, data.image_size)
    _as_process(monkeypatch, 0, 2)
    batches = list(input_pipeline.eval_batches(data, batch_size=8))
    assert len(batches) == 5 == split.eval_batches(8)  # ceil(37 / 8), the other's count
    assert [float(b["mask"].sum()) for b in batches] == [8, 8, 4, 0, 0]
    assert {(b["image"].shape, b["image"].dtype, b["label"].dtype) for b in batches} == {
        ((8, 8, 8, 3), np.dtype(np.float32), np.dtype(np.int32))}
    assert split.train_steps(8) == 2  # the smallest share decides (20 // 8)
