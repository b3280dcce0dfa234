"""Metric outputs of a run: ``metrics.jsonl`` (the contract's schema) and TensorBoard.

Every record is one JSON object per line with ``"step"`` (int), ``"kind"`` in
{"train", "eval", "conditioning", "summary"} and ``"seq"`` (int): the record's position in
the run's history, 0, 1, 2, ... across resumes. The same scalars go to TensorBoard as
``<kind>/<name>`` (:class:`TensorBoardWriter`: the ``tensorboard`` package's event-file
writer, no TensorFlow). Only process 0 writes.

History completeness: a run's summary is computed from the file, so a file that lost
records (deleted or edited mid-run or after it finished) would give a summary from partial
history. :func:`history_problem` compares the ``seq`` values with the number of records the
run wrote (the writer's :attr:`MetricsWriter.count`, carried across resumes through the
checkpoints); records written by an earlier version have no ``seq`` and count by position.

Example:
    >>> import tempfile
    >>> from svdcond_jax.training.writers import MetricsWriter, history_problem, read_metrics
    >>> d = tempfile.mkdtemp()
    >>> w = MetricsWriter(d, tensorboard=False)
    >>> _ = w.write(3, "train", {"loss": 1.0})
    >>> w.close()
    >>> read_metrics(d)
    [{'step': 3, 'kind': 'train', 'seq': 0, 'loss': 1.0}]
    >>> history_problem(read_metrics(d), w.count) is None
    True
    >>> history_problem(read_metrics(d), 3)
    'metrics.jsonl holds 1 of the 3 records this run wrote: 2 missing (seq 1-2)'
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

KINDS = ("train", "eval", "conditioning", "summary")
METRICS_FILE = "metrics.jsonl"
HPARAM_KEYS = ("dim", "seed")  # per-run constants: TensorBoard hparams, not curves


def _plain(value: Any) -> Any:
    """JSON-ready Python scalar (numpy/jax scalars converted; non-finite floats -> None)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        return bool(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return int(arr)
    v = float(arr)
    return v if math.isfinite(v) else None


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of ``workdir/metrics.jsonl`` (optionally of one kind), in file order.

    A run killed mid-write can leave a partial last line; such a line is skipped, so resume
    and reporting still work.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # blank or truncated line
                continue
    return [r for r in records if kind is None or r["kind"] == kind]


def truncate_metrics(workdir: str, last_step: int, *, keep_records: int | None = None
                     ) -> list[dict[str, Any]]:
    """Keeps the records written before a checkpoint (no summary): resume from there.

    The file is replaced atomically (a kill during the rewrite leaves the old file).

    Args:
        workdir: the run's directory.
        last_step: the checkpoint's step (-1: keep nothing); records after it go.
        keep_records: the number of records written before the checkpoint (its record
            count); records with a ``seq`` at or past it go too. None: by step only.

    Returns:
        The records kept.
    """
    records = [r for i, r in enumerate(read_metrics(workdir))
               if r["step"] <= last_step and r["kind"] != "summary"
               and (keep_records is None or r.get("seq", i) < keep_records)]
    path = os.path.join(workdir, METRICS_FILE)
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return records


def _ranges(values: list[int]) -> str:
    """'0-17, 20, 25-26' for sorted ints."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def history_problem(records: list[dict[str, Any]], expected: int) -> str | None:
    """What is wrong with a run's history, or None when it is whole.

    Args:
        records: the records read back (``read_metrics``), summary excluded.
        expected: how many records the run wrote (``seq`` 0 .. expected - 1).

    Returns:
        None if the records are exactly seq 0 .. expected - 1 in order; otherwise a
        sentence saying how many are missing (and which) or duplicated.
    """
    seqs = [r.get("seq", i) for i, r in enumerate(records)]
    if seqs == list(range(expected)):
        return None
    present = set(seqs)
    missing = sorted(set(range(expected)) - present)
    text = f"{METRICS_FILE} holds {len(records)} of the {expected} records this run wrote"
    details = []
    if missing:
        details.append(f"{len(missing)} missing (seq {_ranges(missing)})")
    if len(seqs) != len(present):
        details.append(f"{len(seqs) - len(present)} duplicated (another writer?)")
    unknown = sorted(s for s in present if not 0 <= s < expected)
    if unknown:
        details.append(f"{len(unknown)} not written by this run (seq {_ranges(unknown)})")
    if not details:
        details.append("out of order")
    return f"{text}: {'; '.join(details)}"


class TensorBoardWriter:
    """Scalars and hparams into a TensorBoard event file, without TensorFlow.

    Uses the ``tensorboard`` package's ``EventFileWriter`` and its protocol buffers (the
    format TensorBoard reads; scalars as ``simple_value``, hparams through the hparams
    plugin's ``hparams_pb``).
    """

    def __init__(self, logdir: str) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(logdir)

    def _add(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One event holding ``tag -> value`` at ``step``."""
        from tensorboard.compat.proto import summary_pb2

        self._add(step, summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
            for tag, v in scalars.items()]))

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        """The run's constants for TensorBoard's HPARAMS tab."""
        from tensorboard.plugins.hparams import summary_v2

        self._add(0, summary_v2.hparams_pb(hparams))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, first_seq: int = 0) -> None:
        """Opens the writers (process 0 only; other processes write nothing).

        Args:
            workdir: the run's directory.
            tensorboard: mirror scalars to ``workdir/tensorboard``.
            first_seq: ``seq`` of the first record (records already in the run's history).
        """
        self.enabled = jax.process_index() == 0
        self.count = int(first_seq)  # seq of the next record = records in the history
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        self._hparams: dict[str, Any] = {}
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        """Writes one record; returns it (as written)."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; valid: {KINDS}")
        record = {"step": int(step), "kind": kind, "seq": self.count,
                  **{k: _plain(v) for k, v in values.items()}}
        self.count += 1
        if not self.enabled:
            return record
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._write_tensorboard(step, kind, record)
        return record

    def _write_tensorboard(self, step: int, kind: str, record: dict[str, Any]) -> None:
        """Curves for what changes over steps; per-run constants as hparams (at close).

        None (e.g. the kappa of a singular matrix) is not written: TensorBoard never shows
        the 1/eps cap as if it were a condition number.
        """
        if kind == "summary":
            self._hparams.update({k: v for k, v in record.items()
                                  if k not in ("step", "kind", "seq")
                                  and isinstance(v, (int, float, str, bool))})
            return
        scalars = {}
        for k, v in record.items():
            if k in ("step", "kind", "seq") or not isinstance(v, (int, float)):
                continue
            if k in HPARAM_KEYS:
                self._hparams[k] = v
            else:
                scalars[f"{kind}/{k}"] = float(v)
        if scalars:
            self._tb.write_scalars(int(step), scalars)

    def close(self) -> None:
        """Writes the run's hparams, flushes and closes TensorBoard."""
        if self._tb is not None:
            if self._hparams:
                self._tb.write_hparams(dict(self._hparams))
            self._tb.flush()
            self._tb.close()
