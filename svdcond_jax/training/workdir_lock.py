"""An exclusive lock on a run's workdir, so that two runs never write into the same one.

``train_and_evaluate`` holds :class:`WorkdirLock` for the whole run. It is an advisory
``fcntl.flock`` on ``<workdir>/run.lock``: the kernel releases it when the holder's file
descriptor closes, so a run that exits, raises, or is killed (even ``kill -9``) frees the
workdir at once and a stale lock cannot block a resume. The holder writes its pid, host and
start time into the file; a second run fails at once with :class:`WorkdirBusyError` naming
them. Without the lock two runs into one workdir both "succeed" and interleave their
metrics and checkpoints.

Scope: one host, local file systems (flock on NFS depends on the server). Multi-host runs
take it on process 0 only (the other processes share process 0's workdir).

Example:
    >>> import tempfile
    >>> from svdcond_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock
    >>> d = tempfile.mkdtemp()
    >>> with WorkdirLock(d):
    ...     try:
    ...         WorkdirLock(d).acquire()
    ...     except WorkdirBusyError as e:
    ...         print("busy:", "held by pid" in str(e))
    busy: True
    >>> with WorkdirLock(d):  # released on exit
    ...     pass
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from types import TracebackType

LOCK_FILE = "run.lock"


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock (the message names it)."""


class WorkdirLock:
    """Exclusive advisory lock on ``<workdir>/run.lock`` (a context manager)."""

    def __init__(self, workdir: str) -> None:
        """Prepares (does not take) the lock of ``workdir``; the directory is created."""
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock without waiting.

        Raises:
            WorkdirBusyError: another process (or another lock object) holds it.
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: holder info
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {os.path.dirname(self.path)!r} is in use by another run "
                f"({holder}); two runs into one workdir would interleave their metrics and "
                "checkpoints. Wait for that run to finish (or stop it), or use another "
                "workdir.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (closing the descriptor releases it too, e.g. on a crash)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'held by pid P on HOST since T' from the lock file, or a fallback text."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"held by pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "held by a process that has not written its pid yet"
