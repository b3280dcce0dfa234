"""Several processes (hosts) on ``jax.distributed``: who coordinates, how many, which one.

Every entry point calls :func:`initialize` first, with its ``--coordinator_address``,
``--num_processes`` and ``--process_id`` flags (``None`` when not given). Flags win over the
environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; with none of the six set, the program stays one process. A partial or
inconsistent specification raises ``ValueError`` naming what is missing or wrong, and a
successful call is checked (``jax.process_count()`` must equal the requested count), so a
run never falls back to one process silently. On a CPU backend, cross-process collectives
need an implementation; gloo (shipped with jaxlib) is selected unless the user chose one.

Before ``jax.distributed.initialize`` the processes meet in a short handshake on the
coordinator's port (``training.rendezvous``): a port held by another program, a process
that failed before joining (:func:`report_failure`, e.g. on a bad flag) or went away, and
a process that never comes end the start on every process with a :class:`StartError`
naming the port or the process, within seconds (the last after the timeout,
``SVDCOND_JAX_INIT_TIMEOUT_S``, 300 s by default), instead of a silent wait and a C++
abort.

Example:
    >>> from svdcond_jax.training.distributed import resolve
    >>> resolve(env={}) is None  # nothing given: one process
    True
    >>> resolve("127.0.0.1:1234", 2, 1, env={})
    DistributedSpec(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping

import jax

from svdcond_jax.training import rendezvous
from svdcond_jax.training.rendezvous import StartError

__all__ = ["DistributedSpec", "StartError", "initialize", "report_failure", "resolve"]

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "SVDCOND_JAX_HEARTBEAT_TIMEOUT_S"
ENV_INIT_TIMEOUT = "SVDCOND_JAX_INIT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 300  # jax's own default initialization_timeout


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """A complete multi-process specification."""

    coordinator_address: str  # "host:port" of process 0's coordination service
    num_processes: int  # total number of processes (>= 2)
    process_id: int  # this process, 0 <= process_id < num_processes


def _as_int(name: str, value: int | str | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer; got {name}={value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer; got {name}={value!r}") from None


def resolve(coordinator_address: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None, *, env: Mapping[str, str] | None = None
            ) -> DistributedSpec | None:
    """Merges flags with the environment into a :class:`DistributedSpec`, or None.

    Args:
        coordinator_address: "host:port" (flag), else ``JAX_COORDINATOR_ADDRESS``.
        num_processes: process count (flag), else ``JAX_NUM_PROCESSES``.
        process_id: this process's index (flag), else ``JAX_PROCESS_ID``.
        env: the environment to read (default ``os.environ``).

    Returns:
        None for a single process (nothing given, or ``num_processes == 1`` alone), else the
        spec.

    Raises:
        ValueError: a partial specification (e.g. a coordinator but no process id), a
            malformed address, ``num_processes < 1`` or ``process_id`` out of range.
    """
    env = os.environ if env is None else env
    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = _as_int("num_processes", num_processes if num_processes is not None
                    else env.get(ENV_NUM_PROCESSES))
    index = _as_int("process_id", process_id if process_id is not None
                    else env.get(ENV_PROCESS_ID))
    if count is not None and count < 1:
        raise ValueError(f"num_processes must be >= 1; got num_processes={count}")
    if address is None and index is None and count in (None, 1):
        return None
    missing = [name for name, value in (("coordinator_address", address),
                                        ("num_processes", count), ("process_id", index))
               if value is None]
    if missing:
        raise ValueError(
            f"incomplete multi-process specification: {', '.join(missing)} missing (got "
            f"coordinator_address={address!r}, num_processes={count!r}, "
            f"process_id={index!r}). Give all three, as flags (--coordinator_address, "
            f"--num_processes, --process_id) or as {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
            f"{ENV_PROCESS_ID}, or none of them for one process.")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be 'host:port'; got {address!r}")
    if not 0 <= index < count:
        raise ValueError(f"process_id must be in [0, num_processes); got process_id={index}, "
                         f"num_processes={count}")
    return DistributedSpec(address, count, index)


def _init_timeout(timeout_s: int | str | None) -> int:
    """``timeout_s``, else ``SVDCOND_JAX_INIT_TIMEOUT_S``, else 300 s; at least 1 s."""
    value = _as_int("timeout_s", timeout_s if timeout_s is not None
                    else os.environ.get(ENV_INIT_TIMEOUT))
    if value is not None and value < 1:
        raise ValueError(f"the initialization timeout must be >= 1 s; got {value} "
                         f"(timeout_s or {ENV_INIT_TIMEOUT})")
    return DEFAULT_INIT_TIMEOUT_S if value is None else value


def initialize(coordinator_address: str | None = None, num_processes: int | str | None = None,
               process_id: int | str | None = None, *, timeout_s: int | None = None,
               heartbeat_timeout_s: int | None = None) -> DistributedSpec | None:
    """Connects this process to the others (``jax.distributed.initialize``) when asked to.

    Call it before any other jax call that touches devices. See :func:`resolve` for how
    flags and environment combine. A second call with the same spec is a no-op. First
    the processes meet in the start handshake (``training.rendezvous``): process 0 binds
    the coordinator port and waits for every other process to say it is ready; only then
    does it start jax's coordination service there.

    Args:
        coordinator_address: "host:port" of process 0, or None (environment).
        num_processes: total process count, or None (environment).
        process_id: this process's index, or None (environment).
        timeout_s: how long to wait for the other processes to join (the handshake, then
            jax's own connection). None reads ``SVDCOND_JAX_INIT_TIMEOUT_S``, else 300 s.
        heartbeat_timeout_s: after how long without a heartbeat a process counts as dead;
            then the coordination service fails every other process (they exit with an
            error instead of waiting forever in a collective). None reads
            ``SVDCOND_JAX_HEARTBEAT_TIMEOUT_S``, else jax's default (100 s).

    Returns:
        The spec, or None when running as one process.

    Raises:
        ValueError: see :func:`resolve`; a timeout below 1 s.
        StartError: (a RuntimeError) the coordinator port is held by another program
            (process 0: at once, naming the port; the others: another program answers
            there, or nobody does within the timeout), a process reported that it failed
            before joining or went away (every process: naming it), the processes disagree
            on the count or two share an id, or not all joined within the timeout.
        RuntimeError: jax reports a process count other than the requested one.
    """
    spec = resolve(coordinator_address, num_processes, process_id)
    if spec is None:
        return None
    if not jax.distributed.is_initialized():
        timeout = _init_timeout(timeout_s)
        heartbeat = _as_int("heartbeat_timeout_s", heartbeat_timeout_s
                            if heartbeat_timeout_s is not None else os.environ.get(ENV_HEARTBEAT))
        if spec.process_id == 0:
            rendezvous.serve(spec.coordinator_address, spec.num_processes, timeout)
        else:
            rendezvous.join(spec.coordinator_address, spec.num_processes, spec.process_id,
                            timeout)
        if not jax.config.jax_cpu_collectives_implementation:
            # CPU devices of different processes talk through gloo; harmless on accelerators.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {} if heartbeat is None else {"heartbeat_timeout_seconds": heartbeat}
        jax.distributed.initialize(spec.coordinator_address, spec.num_processes,
                                   spec.process_id, initialization_timeout=timeout, **kwargs)
    _exit_on_uncaught_exception()
    if jax.process_count() != spec.num_processes or jax.process_index() != spec.process_id:
        raise RuntimeError(
            f"jax.distributed reports process {jax.process_index()} of {jax.process_count()}, "
            f"but process {spec.process_id} of {spec.num_processes} was requested")
    return spec


def report_failure(message: str, coordinator_address: str | None = None,
                   num_processes: int | str | None = None, process_id: int | str | None = None,
                   *, timeout_s: int | None = None) -> bool:
    """Tells the other processes that this one failed before joining (e.g. a bad flag).

    For a process that cannot go on to :func:`initialize`: with a multi-process
    specification (flags or environment, as in :func:`resolve`) it prints ``message`` to
    stderr at once, then a process > 0 tells process 0, which stops every process with an
    error naming this one and carrying ``message``; process 0 tells every process that
    connects. It waits for them up to the initialization timeout (``timeout_s``, as in
    :func:`initialize`) and returns as soon as they were told. Nothing happens for one
    process, an unusable specification, or after :func:`initialize`.

    Args:
        message: the error, as the user should read it.
        coordinator_address: as for :func:`initialize` (None: environment).
        num_processes: as for :func:`initialize`.
        process_id: as for :func:`initialize`.
        timeout_s: as for :func:`initialize`.

    Returns:
        True when the others were told.

    Example:
        >>> report_failure("error: bad flag", num_processes=1)  # one process: nobody to tell
        False
    """
    try:
        spec = resolve(coordinator_address, num_processes, process_id)
        timeout = _init_timeout(timeout_s)
    except (TypeError, ValueError):
        return False
    if spec is None or jax.distributed.is_initialized():
        return False
    who = "the other processes" if spec.process_id == 0 else "process 0"
    print(f"{message}\n[process {spec.process_id} of {spec.num_processes}: telling {who} at "
          f"{spec.coordinator_address} before exiting; giving up after {timeout} s]",
          file=sys.stderr, flush=True)
    return rendezvous.report_failure(spec.coordinator_address, spec.num_processes,
                                     spec.process_id, message, timeout)


def _exit_on_uncaught_exception() -> None:
    """Makes an uncaught exception end this process at once (after printing it).

    A normal exit runs ``jax.distributed.shutdown`` at interpreter exit, which waits for the
    other processes, while they wait for this one in their next collective: a run where one
    process failed would hang until the shutdown timeout. Leaving at once instead stops this
    process's heartbeats, so the coordination service fails the others after
    ``heartbeat_timeout_s``, and a launcher (experiments/launch.py) stops them at once.
    """
    if getattr(sys.excepthook, "_svdcond_exit", False):
        return
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:  # noqa: ANN001 (sys.excepthook's signature)
        previous(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    hook._svdcond_exit = True  # type: ignore[attr-defined]
    sys.excepthook = hook
