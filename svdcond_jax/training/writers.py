"""Metric outputs of a run: ``metrics.jsonl`` (the contract's schema) and TensorBoard.

Every record is one JSON object per line with ``"step"`` (int) and ``"kind"`` in
{"train", "eval", "conditioning", "summary"}; the same scalars go to TensorBoard through
``clu.metric_writers`` as ``<kind>/<name>``. Only process 0 writes.

Example:
    >>> import tempfile
    >>> from svdcond_jax.training.writers import MetricsWriter, read_metrics
    >>> d = tempfile.mkdtemp()
    >>> w = MetricsWriter(d, tensorboard=False)
    >>> _ = w.write(3, "train", {"loss": 1.0})
    >>> w.close()
    >>> read_metrics(d)
    [{'step': 3, 'kind': 'train', 'loss': 1.0}]
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

KINDS = ("train", "eval", "conditioning", "summary")
METRICS_FILE = "metrics.jsonl"


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


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Keeps only records with ``step <= last_step`` (and no summary): resume from there."""
    records = [r for r in read_metrics(workdir)
               if r["step"] <= last_step and r["kind"] != "summary"]
    with open(os.path.join(workdir, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
        """Opens the writers (process 0 only; other processes write nothing)."""
        self.enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from clu import metric_writers

                self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        """Writes one record; returns it (as written)."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; valid: {KINDS}")
        record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        if not self.enabled:
            return record
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            scalars = {f"{kind}/{k}": float(v) for k, v in record.items()
                       if k not in ("step", "kind") and isinstance(v, (int, float))}
            if scalars:
                self._tb.write_scalars(int(step), scalars)
        return record

    def close(self) -> None:
        """Flushes and closes TensorBoard."""
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
