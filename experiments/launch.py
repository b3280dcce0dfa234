"""Runs a module as N local processes of one ``jax.distributed`` program (docs/distributed.md).

Usage::

    python -m experiments.launch --processes 2 [--devices_per_process 1] \\
        [--timeout_s SECONDS] -- experiments.run --config=...
    svdcond-launch --processes 2 -- experiments.run --config=digits_demo ...

(``experiments.X`` runs as ``svdcond_jax.experiments.X`` where only the installed package
has it.)

Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` (read by ``svdcond_jax.training.distributed.initialize``, which the module
must call first) and ``XLA_FLAGS`` with ``--xla_force_host_platform_device_count`` set to
``--devices_per_process`` (CPU devices; other XLA flags are kept). Every output line of
process ``i`` is printed prefixed with ``[pi]``. The first process that exits non-zero (or
Ctrl-C, SIGTERM, or the timeout) ends all of them (SIGTERM to each process group, SIGKILL after a
grace period); the exit code is the first non-zero one (128 + signal for a killed process,
124 on timeout, 130 on Ctrl-C, 143 on SIGTERM), else 0.

This is for one machine (a workstation, CI, a smoke test of a cluster job); on a cluster
the scheduler starts the processes (docs/distributed.md).

Example:
    >>> from experiments.launch import process_env
    >>> env = process_env({"XLA_FLAGS": "--xla_cpu_foo=1"}, "127.0.0.1:1234", 2, 1, 3)
    >>> env["JAX_PROCESS_ID"], env["XLA_FLAGS"]
    ('1', '--xla_cpu_foo=1 --xla_force_host_platform_device_count=3')
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(base: Mapping[str, str], address: str, processes: int, index: int,
                devices: int) -> dict[str, str]:
    """The environment of process ``index``: coordinator, count, id and device count.

    Args:
        base: the environment to start from (``os.environ``).
        address: the coordinator's "host:port".
        processes: number of processes.
        index: this process's id.
        devices: CPU devices of this process (replaces any device count in ``XLA_FLAGS``).

    Returns:
        A new environment dict.
    """
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    env = dict(base)
    env.update({"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(processes),
                "JAX_PROCESS_ID": str(index), "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": " ".join([*flags, f"{_DEVICE_FLAG}={devices}"])})
    return env


def _pump(index: int, stream: TextIO, out: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[p{index}] {line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to every live process group, SIGKILL to what survives the grace period."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.05)


class _Terminated(Exception):
    """The launcher received SIGTERM (e.g. from a scheduler): stop the processes, exit."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def launch(command: Sequence[str], *, processes: int, devices_per_process: int = 1,
           timeout_s: float | None = None, out: TextIO | None = None,
           env: Mapping[str, str] | None = None) -> int:
    """Runs ``python -m <command>`` as ``processes`` local processes; returns the exit code.

    Args:
        command: module name and its arguments.
        processes: number of processes (>= 1).
        devices_per_process: CPU devices per process (>= 1).
        timeout_s: kill everything after this many seconds (exit code 124); None: no limit.
        out: where the prefixed lines go (default ``sys.stdout``).
        env: base environment (default ``os.environ``).

    Returns:
        The first non-zero exit code (128 + signal for a killed process), 124 on timeout,
        130 on Ctrl-C, 143 on SIGTERM (the processes are stopped in every case), else 0.

    Raises:
        ValueError: ``processes`` or ``devices_per_process`` < 1, or an empty command.
    """
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"processes and devices_per_process must be >= 1; got "
                         f"processes={processes}, devices_per_process={devices_per_process}")
    if not command:
        raise ValueError("command is empty: give a module after '--'")
    out = sys.stdout if out is None else out
    base = os.environ if env is None else env
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return _launch(command, processes, devices_per_process, timeout_s, out, base)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return _launch(command, processes, devices_per_process, timeout_s, out, base)


def _launch(command: Sequence[str], processes: int, devices_per_process: int,
            timeout_s: float | None, out: TextIO, base: Mapping[str, str]) -> int:
    """:func:`launch` after the argument checks."""
    address = f"127.0.0.1:{free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    code = 0
    try:
        for i in range(processes):
            p = subprocess.Popen(
                [sys.executable, "-u", "-m", *command], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                env=process_env(base, address, processes, i, devices_per_process))
            procs.append(p)
            t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
            t.start()
            pumps.append(t)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failed: list[int] = []  # processes that exited non-zero, in the order seen
        while True:
            status = [p.poll() for p in procs]  # poll every process, every time
            failed += [i for i, rc in enumerate(status) if rc not in (None, 0)
                       and i not in failed]
            if failed or all(rc is not None for rc in status):
                code = _exit_code(procs[failed[0]].returncode) if failed else 0
                break
            if deadline is not None and time.monotonic() > deadline:
                with lock:
                    out.write(f"[launch] timeout after {timeout_s} s: stopping all\n")
                code = 124
                break
            time.sleep(0.05)
        if failed:
            with lock:
                out.write(f"[launch] exit code {code} (process(es) {failed}): stopping all\n")
    except KeyboardInterrupt:
        code = 130
    except _Terminated:
        code = 128 + signal.SIGTERM
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=GRACE_S)
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()
    return code


def resolve_module(module: str) -> str:
    """``module``, or ``svdcond_jax.<module>`` when only the installed name imports.

    ``experiments.run`` imports from a checkout's root; elsewhere the installed package
    has it as ``svdcond_jax.experiments.run``.
    """
    import importlib.util

    for name in (module, f"svdcond_jax.{module}"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ImportError:  # the parent package is not importable here
            continue
    return module


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="svdcond-launch", usage="%(prog)s --processes N [--devices_per_process M] "
        "[--timeout_s S] -- MODULE [ARGS...]", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, required=True,
                        help="number of local processes")
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="CPU devices per process (default 1)")
    parser.add_argument("--timeout_s", type=float, default=None,
                        help="stop all processes after this many seconds")
    args = parser.parse_args(argv[:split])  # --help: prints and exits 0
    if split == len(argv):
        parser.print_usage(sys.stderr)
        print("error: the module to run goes after --", file=sys.stderr)
        return 2
    command = argv[split + 1:]
    if command:
        command[0] = resolve_module(command[0])
    return launch(command, processes=args.processes,
                  devices_per_process=args.devices_per_process, timeout_s=args.timeout_s)


def cli() -> None:
    """The ``svdcond-launch`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
