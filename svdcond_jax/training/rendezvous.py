"""The start handshake of several processes, before ``jax.distributed.initialize``.

``jax.distributed.initialize`` alone handles a failed start badly (measured, jax 0.10.2):
process 0 waits ``initialization_timeout`` (300 s) for a process that already exited (say,
on a bad flag) and then aborts with a C++ check-failure trace; a coordinator port held by
another program gives ``JaxRuntimeError: UNKNOWN: Failed to start RPC server`` (the port
only in a C++ log line) and leaves the other processes waiting silently. So the processes
first meet here, on the coordinator's own port, with a few lines of JSON over TCP, and
only when all of them are there does process 0 close the port and start jax's service on
it:

1. Process 0 binds the coordinator port (on all interfaces, as jax does): if another
   program holds it, :class:`StartError` names the port at once. It greets every
   connection and waits for each process ``1 .. N-1`` to report "ready" or "failed".
2. Every other process connects (retrying until process 0 listens), checks the greeting
   (anything else means another program holds the port: it says so), reports "ready"
   and waits for "go" or "abort".
3. Process 0 answers "go" to all when all N-1 are ready. It answers "abort" with the reason
   to all, and raises, when a process reports that it failed (:func:`report_failure`: the
   message names the process and carries its error), when a connected process goes away
   (it exited), when two processes claim the same id or disagree on the count, or at the
   timeout (naming the missing processes).

Every wait ends at the timeout (``timeout_s``, 300 s by default like jax's): a process
whose peers never come says which one it waited for, at which address, instead of
aborting. Process 0 also answers "abort" to processes that connect after it failed
before joining (:func:`report_failure`).

Example:
    >>> from svdcond_jax.training.rendezvous import StartError
    >>> issubclass(StartError, RuntimeError)
    True
"""

from __future__ import annotations

import errno
import json
import select
import socket
import time
from typing import Any

PROTOCOL = "svdcond_jax start"
_POLL_S = 0.25  # between connection attempts of a process waiting for process 0


class StartError(RuntimeError):
    """The processes could not all start: the message says which one failed and why."""


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass  # the peer is gone: it learns nothing, and the caller decides what that means


class _Lines:
    """Newline-terminated JSON messages from one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def feed(self) -> bool:
        """Reads what arrived; False at end of file (or a reset connection)."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            return False
        self.buffer += data
        return bool(data)

    def message(self) -> dict[str, Any] | None:
        """The first complete line as a dict; None if incomplete; ValueError if not ours."""
        line, sep, rest = self.buffer.partition(b"\n")
        if not sep:
            if len(self.buffer) > 65536:
                raise ValueError(self.buffer[:60])
            return None
        self.buffer = rest
        try:
            message = json.loads(line)
        except ValueError:
            raise ValueError(line[:60]) from None
        if not isinstance(message, dict):
            raise ValueError(line[:60])
        return message

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next message, waiting until ``deadline``; None at end of file.

        Raises:
            TimeoutError: nothing complete arrived by the deadline.
            ValueError: what arrived is not one of our messages (its first bytes).
        """
        while True:
            message = self.message()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise TimeoutError
            if not self.feed():
                if self.buffer:
                    raise ValueError(self.buffer[:60])
                return None


def listen(address: str) -> socket.socket:
    """Binds the coordinator port of ``address`` on every interface (as jax's service does).

    Raises:
        StartError: the port is taken (naming it and the address), or cannot be bound.
    """
    port, error = _port(address), None
    for family, wildcard in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # no IPv6 on this host
            error = e
            continue
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not TIME_WAIT
            sock.bind((wildcard, port))
            sock.listen(128)
            return sock
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise StartError(
                    f"coordinator port {port} is already in use on this host "
                    f"(coordinator_address={address}): another program holds it. Choose a "
                    "free port for --coordinator_address / JAX_COORDINATOR_ADDRESS (the same "
                    "on every process)") from None
            error = e
    raise StartError(f"cannot listen on coordinator port {port} (coordinator_address="
                     f"{address}): {getattr(error, 'strerror', None) or error}")


def serve(address: str, num_processes: int, timeout_s: float) -> None:
    """Process 0's side: waits for processes 1..N-1, then answers "go" to all.

    Raises:
        StartError: the port is taken, a process failed or went away, the processes do not
            agree, or not all joined within ``timeout_s`` (the others were told, "abort").
    """
    listener = listen(address)
    peers: dict[int, socket.socket] = {}
    strangers: dict[socket.socket, _Lines] = {}  # connected, not yet identified
    deadline = time.monotonic() + timeout_s
    try:
        while len(peers) < num_processes - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [i for i in range(1, num_processes) if i not in peers]
                raise StartError(
                    f"process(es) {missing} of {num_processes} did not join process 0 at "
                    f"{address} within {timeout_s:g} s (not started, or failed before "
                    "they could say so)")
            readable = select.select([listener, *strangers, *peers.values()], [], [],
                                     remaining)[0]
            for sock in readable:
                if sock is listener:
                    conn, _ = listener.accept()
                    _send(conn, {"protocol": PROTOCOL, "num_processes": num_processes})
                    strangers[conn] = _Lines(conn)
                elif sock in strangers:
                    _hear(strangers, sock, peers, num_processes)
                else:  # a joined process may only go away: it exited
                    index = next(i for i, s in peers.items() if s is sock)
                    raise StartError(f"process {index} exited (its connection closed) before "
                                     f"every process had joined")
        for sock in peers.values():
            _send(sock, {"go": True})
    except StartError as e:
        for sock in [*peers.values(), *strangers]:
            _send(sock, {"abort": str(e)})
        raise
    finally:
        for sock in [*peers.values(), *strangers]:
            sock.close()
        listener.close()


def _hear(strangers: dict[socket.socket, _Lines], sock: socket.socket,
          peers: dict[int, socket.socket], num_processes: int) -> None:
    """Reads from a connection that has not said which process it is."""
    lines = strangers[sock]
    try:
        alive = lines.feed()
        message = lines.message()
    except ValueError:  # not one of ours (a port scan, a health check): ignore it
        message, alive = None, False
    if message is None:
        if not alive:
            strangers.pop(sock)
            sock.close()
        return
    # On an error the connection stays among the strangers: it is told "abort" too.
    index, count = message.get("process"), message.get("num_processes")
    if count != num_processes:
        raise StartError(f"process {index} was started with num_processes={count}, process 0 "
                         f"with num_processes={num_processes}")
    if not isinstance(index, int) or not 0 < index < num_processes:
        raise StartError(f"a process with process_id={index!r} connected; valid ids are "
                         f"1..{num_processes - 1} (0 is the coordinator)")
    if message.get("status") == "failed":  # its message, without a command line's "error: "
        reason = str(message.get("message")).removeprefix("error: ")
        raise StartError(f"process {index} failed before joining: {reason}")
    if index in peers:
        raise StartError(f"two processes were started with process_id={index}")
    peers[index] = strangers.pop(sock).sock


def join(address: str, num_processes: int, process_id: int, timeout_s: float, *,
         failure: str | None = None) -> None:
    """A process > 0: waits for process 0, says "ready" (or reports ``failure``), waits for
    "go".

    Args:
        address: the coordinator's "host:port".
        num_processes: N.
        process_id: this process, 1..N-1.
        timeout_s: how long to wait for process 0 and then for the others.
        failure: report that this process failed before joining, with this message, and
            return at once (it does not wait for "go").

    Raises:
        StartError: process 0 did not answer, another program answered on its port,
            process 0 aborted the start (the message says why), or it went away.
    """
    host, port = address.rpartition(":")[0].strip("[]"), _port(address)
    where = f"process {process_id}"
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StartError(f"{where}: process 0 did not answer at {address} within "
                             f"{timeout_s:g} s ({last}): is it running, on that host and port?")
        try:
            sock = socket.create_connection((host, port), timeout=min(remaining, 5.0))
        except OSError as e:
            last = f"last attempt: {e.strerror or e}"
            time.sleep(min(_POLL_S, max(remaining, 0.0)))
            continue
        with sock:
            sock.setblocking(True)
            lines = _Lines(sock)
            try:
                greeting = lines.receive(deadline)
            except TimeoutError:
                raise StartError(
                    f"{where}: {address} accepted a connection but never answered as process "
                    f"0 of this program within {timeout_s:g} s: another program holds that "
                    "port, or process 0 is stuck") from None
            except ValueError as e:
                raise StartError(
                    f"{where}: {address} answered {e.args[0]!r}, not process 0's start "
                    "handshake: another program holds that port (or this run's processes "
                    "had all joined already)") from None
            if greeting is None:  # closed at once (e.g. a handshake that just ended)
                last = "last attempt: the connection was closed at once"
                time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
                continue
            if greeting.get("protocol") != PROTOCOL:
                raise StartError(f"{where}: {address} answered {str(greeting)[:60]!r}, not "
                                 "process 0's start handshake: another program holds that port")
            status = {"process": process_id, "num_processes": num_processes}
            if failure is not None:
                _send(sock, {**status, "status": "failed", "message": failure})
                return
            _send(sock, {**status, "status": "ready"})
            try:
                answer = lines.receive(deadline)
            except TimeoutError:
                raise StartError(f"{where}: not every process joined process 0 at {address} "
                                 f"within {timeout_s:g} s") from None
            except ValueError as e:
                raise StartError(f"{where}: process 0 answered {e.args[0]!r}") from None
            if answer is None:
                raise StartError(f"{where}: process 0 at {address} closed the connection "
                                 "before every process had joined (it failed or was stopped)")
            if "abort" in answer:
                raise StartError(f"{where}: process 0 stopped the start: {answer['abort']}")
            return


def report_failure(address: str, num_processes: int, process_id: int, message: str,
                   timeout_s: float) -> bool:
    """Tells the others that this process failed before joining; True if told.

    A process > 0 tells process 0 (which then stops every process, naming this one); it
    waits up to ``timeout_s`` for process 0 to listen. Process 0 answers "abort" to every
    process that connects, until all N-1 have been told or ``timeout_s`` has passed (a
    held port: nobody can be told).
    """
    if process_id > 0:
        try:
            join(address, num_processes, process_id, timeout_s, failure=message)
        except StartError:
            return False
        return True
    try:
        listener = listen(address)
    except StartError:
        return False
    told, deadline = 0, time.monotonic() + timeout_s
    text = f"process 0 failed before joining: {message.removeprefix('error: ')}"
    try:
        while told < num_processes - 1 and (remaining := deadline - time.monotonic()) > 0:
            if not select.select([listener], [], [], remaining)[0]:
                break
            conn, _ = listener.accept()
            with conn:
                _send(conn, {"protocol": PROTOCOL, "num_processes": num_processes})
                try:
                    reply = _Lines(conn).receive(min(deadline, time.monotonic() + 5.0))
                except (TimeoutError, ValueError):
                    continue
                if reply is not None:
                    _send(conn, {"abort": text})
                    told += 1
    finally:
        listener.close()
    return told == num_processes - 1
