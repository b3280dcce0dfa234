"""Starting several processes by hand: every failed start ends every process, clearly.

The processes are started with ``JAX_*`` variables and no launcher, as a user (or a
scheduler) does. Claims (docs/distributed.md, "Starting the processes"): a process that
exits on a bad flag makes process 0 stop within seconds, naming it and its error (before:
process 0 waited 300 s and aborted with a C++ trace); a coordinator port held by another
program is named at once by process 0, and the other processes give up after the
(configurable) initialization timeout with a message that says what answered there;
process 0 failing before joining stops the others; processes that disagree, or do not
come, are named. The handshake itself is also exercised in-process on real sockets.

Every subprocess runs in its own process group and is killed in ``finally``. The time
bounds are far below the 300 s the processes waited before; they guard against that
hang, they are not speed targets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments import launch
from svdcond_jax.training import distributed, rendezvous
from svdcond_jax.training.rendezvous import StartError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "configs" / "digits_demo.py")
# Process 0 of a multi-process program started by hand: what it runs up to joining.
INITIALIZE = "from svdcond_jax.training import distributed; distributed.initialize()"
STOP_BOUND_S = 60  # "within seconds" on a loaded 2-core CI machine; before: 300 s


def _env(address: str, index: int, count: int = 2, timeout_s: int = 120) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": str(count), "JAX_PROCESS_ID": str(index),
            distributed.ENV_INIT_TIMEOUT: str(timeout_s), "PYTHONUNBUFFERED": "1"}


def _start(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True), log


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def _run_args(workdir: Path, *extra: str) -> list[str]:
    return ["-m", "experiments.run", f"--config={CONFIG}", "--quick", "--methods=svd",
            "--seeds=0", f"--workdir={workdir}", *extra]


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """(exit code, time it ended); fails the test if it is still running after ``timeout``."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s")
    return code, time.monotonic()


def test_a_process_failing_on_a_bad_flag_stops_process_0_within_seconds(tmp_path):
    address = f"127.0.0.1:{launch.free_port()}"
    p0, log0 = _start(_run_args(tmp_path / "w"), _env(address, 0), tmp_path / "p0.log")
    p1, log1 = _start(_run_args(tmp_path / "w", "--config.batch_size=abc"), _env(address, 1),
                      tmp_path / "p1.log")
    try:
        code1, end1 = _wait(p1, 240)
        code0, end0 = _wait(p0, 240)
    finally:
        _finish([p0, p1])
    out0, out1 = log0.read_text(), log1.read_text()
    assert code1 == 1 and "error: flag --config.batch_size=abc" in out1, out1
    assert code0 == 1, out0
    assert ("error: process 1 failed before joining: flag --config.batch_size=abc: invalid "
            "literal for int()") in out0, out0
    assert end0 - end1 < STOP_BOUND_S  # measured 0.1 s (it waited 300 s before)
    assert "Check failure" not in out0 and not (tmp_path / "w_quick").exists()


def test_a_held_coordinator_port_is_named_and_the_others_give_up(tmp_path):
    holder = socket.socket()  # another program: listens, never answers
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    procs = []
    try:
        p0, log0 = _start(["-c", INITIALIZE], _env(address, 0, timeout_s=3), tmp_path / "p0")
        p1, log1 = _start(["-c", INITIALIZE], _env(address, 1, timeout_s=3), tmp_path / "p1")
        procs = [p0, p1]
        code0, _ = _wait(p0, 120)
        code1, _ = _wait(p1, 120)
    finally:
        _finish(procs)
        holder.close()
    out0, out1 = log0.read_text(), log1.read_text()
    port = address.rpartition(":")[2]
    assert code0 == 1 and f"StartError: coordinator port {port} is already in use" in out0
    assert code1 == 1 and (f"StartError: process 1: {address} accepted a connection but "
                           "never answered as process 0 of this program within 3 s") in out1
    assert "Check failure" not in out0 + out1


def test_process_0_failing_before_joining_stops_the_others(tmp_path):
    address = f"127.0.0.1:{launch.free_port()}"
    fail = ("from svdcond_jax.training import distributed; "
            "distributed.report_failure('error: process 0 gave up on purpose')")
    procs = []
    try:
        p1, log1 = _start(["-c", INITIALIZE], _env(address, 1), tmp_path / "p1")
        p0, log0 = _start(["-c", fail], _env(address, 0), tmp_path / "p0")
        procs = [p0, p1]
        code0, end0 = _wait(p0, 240)
        code1, end1 = _wait(p1, 240)
    finally:
        _finish(procs)
    out1 = log1.read_text()
    assert code0 == 0 and "telling the other processes at" in log0.read_text()
    assert code1 == 1 and ("StartError: process 1: process 0 stopped the start: process 0 "
                           "failed before joining: process 0 gave up on purpose") in out1
    assert end1 - end0 < STOP_BOUND_S


# ----------------------------------------------------------------- the handshake in-process


def _address() -> str:
    return f"127.0.0.1:{launch.free_port()}"


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Runs ``fn`` in a thread; the list receives its exception (or None)."""
    result: list = []

    def run():
        try:
            fn(*args, **kwargs)
            result.append(None)
        except StartError as e:
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _joined(threads) -> list:
    for thread, _ in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    return [result[0] for _, result in threads]


def test_handshake_all_ready_then_the_port_is_free_again():
    address = _address()
    threads = [_in_thread(rendezvous.serve, address, 3, 20)]
    threads += [_in_thread(rendezvous.join, address, 3, i, 20) for i in (2, 1)]
    assert _joined(threads) == [None, None, None]
    rendezvous.listen(address).close()  # process 0 released the port for jax's service


@pytest.mark.parametrize("ids, count, match", [
    ((1, 1), 3, "two processes were started with process_id=1"),
    ((1,), 4, "process 1 was started with num_processes=4, process 0 with num_processes=2"),
])
def test_handshake_refuses_processes_that_disagree(ids, count, match):
    address = _address()
    server = _in_thread(rendezvous.serve, address, 3 if len(ids) == 2 else 2, 20)
    time.sleep(0.2)
    clients = [_in_thread(rendezvous.join, address, count, i, 20) for i in ids]
    errors = _joined([server, *clients])
    assert match in str(errors[0])
    assert any(e is not None and "process 0 stopped the start" in str(e) for e in errors[1:])


def test_handshake_names_a_process_that_went_away_or_never_came():
    address = _address()
    server = _in_thread(rendezvous.serve, address, 3, 20)
    deadline = time.monotonic() + 20
    while True:  # "process 1" joins by hand, then exits before process 2 came
        try:
            sock = socket.create_connection(("127.0.0.1", int(address.rpartition(":")[2])))
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    sock.recv(1000)
    sock.sendall(b'{"process": 1, "num_processes": 3, "status": "ready"}\n')
    time.sleep(0.3)
    sock.close()
    (error,) = _joined([server])
    assert "process 1 exited (its connection closed) before every process had joined" in str(
        error)
    started = time.monotonic()
    with pytest.raises(StartError, match=r"process\(es\) \[1, 2\] of 3 did not join process 0 "
                                         r"at .* within 1 s"):
        rendezvous.serve(_address(), 3, 1)
    assert time.monotonic() - started < 30
    with pytest.raises(StartError, match=r"process 2: process 0 did not answer at .* within 1 s"):
        rendezvous.join(_address(), 3, 2, 1)


def test_handshake_ignores_strangers_and_names_what_answered_on_the_port():
    address = _address()
    server = _in_thread(rendezvous.serve, address, 2, 20)
    time.sleep(0.2)
    port = int(address.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port)) as probe:  # a port scan, say
        probe.sendall(b"GET / HTTP/1.0\r\n\r\n")
    client = _in_thread(rendezvous.join, address, 2, 1, 20)
    assert _joined([server, client]) == [None, None]
    talker = socket.socket()
    talker.bind(("127.0.0.1", 0))
    talker.listen()

    def answer():
        conn, _ = talker.accept()
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(StartError, match=r"answered b'HTTP/1.0 400 Bad Request.*another "
                                             r"program holds that port"):
            rendezvous.join(f"127.0.0.1:{talker.getsockname()[1]}", 2, 1, 20)
    finally:
        talker.close()


def test_initialize_and_report_failure_options(monkeypatch):
    monkeypatch.setenv(distributed.ENV_INIT_TIMEOUT, "0")
    with pytest.raises(ValueError, match="timeout must be >= 1 s; got 0"):
        distributed.initialize("127.0.0.1:1", 2, 1)
    assert not distributed.report_failure("x")  # no multi-process specification
    assert not distributed.report_failure("x", "127.0.0.1:1", 2)  # an unusable one
