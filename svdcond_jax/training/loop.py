"""``train_and_evaluate(config, workdir)``: the training loop, composed of small functions.

One run: validate the config (:func:`~svdcond_jax.training.config.validate_config`, before
any data or compilation) -> lock the workdir (a second run into it fails at once, naming the
holder) -> load data (exits at once if a TFDS dataset is missing; a split smaller than one
batch raises) -> build model/optimizer from the method name -> restore the newest checkpoint
of ``workdir`` that verifies (damaged ones are moved aside, with a warning) -> for each
step: place a batch on the devices, run the compiled step (non-finite steps are skipped and
counted), then the periodic actions (:func:`due`: every N steps, and at the last step):
train record every ``log_every_steps``, float64 conditioning record
every ``monitor_every_steps`` (a non-finite batch gives a record with ``finite: false``),
evaluation every ``eval_every_epochs`` and checkpoint every ``checkpoint_every_epochs``
-> summary record. Outputs in ``workdir``: ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` (``checkpoints_damaged/`` if any were), ``run.lock``.

Exact resume: the data order and augmentation are functions of (seed, epoch, position), and
the checkpoint holds the whole array state, so a run restarted from its last checkpoint ends
with the same parameters as an uninterrupted one (``metrics.jsonl`` is truncated back to the
records written before the checkpoint and continued). ``train_time_s`` counts this
process's run only.

History: each checkpoint records how many metrics records preceded it, and every record has
a ``seq``; the summary says ``complete: true`` only when the file holds exactly the run's
records. Otherwise (the file was deleted or edited) ``complete`` is false,
``history_problem`` says what is missing, the aggregates over the history
(``best_val_error``, ``median_kappa_eps``) are null, and a warning says the summary is not
a result (experiments/tables.py leaves such runs out).

Multi-process (docs/distributed.md): call
:func:`svdcond_jax.training.distributed.initialize` at the start of the program, before any
other jax call, then ``train_and_evaluate`` in every process with the same config and a
shared ``workdir``. Each process feeds its rows of every global batch (for in-memory data
the global batches equal one process's, so the parameters equal a one-process run's to
round-off), the steps are jit-compiled over the mesh of every process's devices
(``parallel="pmap"`` is refused), checkpoints are written jointly by orbax and restore in
any process layout. Only process 0 takes the workdir lock and writes metrics (JSON lines,
TensorBoard, summary) and integrity records; the conditioning monitor reads the replicated
features of the whole global batch, so the records equal a one-process run's. Every process
returns process 0's summary (broadcast). tests/test_distributed.py runs this
with two local processes.

Example:
    >>> import tempfile
    >>> from svdcond_jax.training.config import get_config
    >>> from svdcond_jax.training.loop import train_and_evaluate
    >>> config = get_config()
    >>> config.num_train_steps, config.progress_bar = 2, False
    >>> summary = train_and_evaluate(config, tempfile.mkdtemp())  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from svdcond_jax.optimizers import find_olr_eta
from svdcond_jax.training import checkpointing, input_pipeline, monitor, steps, writers
from svdcond_jax.training.config import validate_config
from svdcond_jax.training.state import (
    Setup,
    TrainState,
    create_setup,
    create_train_state,
    pre_inject_layout,
)
from svdcond_jax.training.state import find_param as _find_param
from svdcond_jax.training.state import learning_rate as _learning_rate
from svdcond_jax.training.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


def _local_batch_size(batch_size: int) -> int:
    n_proc, n_dev = jax.process_count(), jax.local_device_count()
    if batch_size % (n_proc * n_dev):
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of devices "
                         f"{n_proc * n_dev}")
    return batch_size // n_proc


def _prefetch(batches: Iterator[dict], place: Any, size: int) -> Iterator[dict]:
    """Places up to ``size`` batches on the devices ahead of their use."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(place(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _train_iterator(config: Any, data: input_pipeline.Data, par: steps.Parallel,
                    start_step: int, steps_per_epoch: int) -> Iterator[dict]:
    """Device batches from ``start_step`` on, epoch after epoch (deterministic order)."""
    epoch, offset = divmod(start_step, steps_per_epoch)
    local = _local_batch_size(config.batch_size)
    while True:
        batches = input_pipeline.train_batches(data, batch_size=local, seed=config.seed,
                                               epoch=epoch, start_batch=offset,
                                               shuffle_buffer=config.shuffle_buffer)
        yield from _prefetch(batches, par.place_batch, config.prefetch)
        epoch, offset = epoch + 1, 0


def _eval_sums(sums: dict[str, Any]) -> np.ndarray:
    """One batch's masked sums (``steps.eval_step``) as host float64 (loss, correct, count).

    The compiled eval step already reduces (and ``psum``s under pmap) to these sums;
    float64 keeps the accumulation over many batches exact to float32's inputs.
    """
    return np.array([sums["loss_sum"], sums["correct"], sums["count"]], np.float64)


def evaluate(config: Any, data: input_pipeline.Data, par: steps.Parallel,
             state: TrainState) -> dict[str, float]:
    """Loss, accuracy, error (%) and the number of examples over the whole eval split
    (real examples only)."""
    local = _local_batch_size(config.eval_batch_size)
    totals = np.zeros(3, np.float64)
    for batch in input_pipeline.eval_batches(data, batch_size=local):
        totals += _eval_sums(par.host(par.eval_step(state, par.place_batch(batch))))
    loss_sum, correct, count = totals
    if count == 0:
        raise ValueError("the eval split holds no example")
    accuracy = float(correct / count)
    return {"loss": float(loss_sum / count), "accuracy": accuracy,
            "error": 100.0 * (1.0 - accuracy), "examples": int(round(count))}


def _scalar(x: Any) -> float:
    """One replicated scalar as a float (a pmap state's first replica; local data only)."""
    if isinstance(x, jax.Array):
        x = x.addressable_data(0)
    return float(np.asarray(x).reshape(-1)[0])


def _olr_eta(opt_state: Any) -> float | None:
    """OLR's last eta as a float; reads one scalar."""
    eta = find_olr_eta(opt_state)
    return None if eta is None else _scalar(eta)


def _addressable(x: jax.Array) -> np.ndarray:
    """This process's part of a (possibly multi-host sharded) array, on the host (the whole
    array when it is replicated)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards if s.replica_id == 0])


def conditioning_record(setup: Setup, par: steps.Parallel, state: TrainState,
                        batch: dict) -> dict[str, Any]:
    """Float64 conditioning of the Pre-SVD output on ``batch`` + weight norm + OLR eta.

    A batch with NaN/Inf gives a record with ``finite: False`` (see ``monitor``).
    """
    feats = _addressable(par.features_step(state, batch))
    record = monitor.conditioning_stats(feats, eps=setup.monitor_eps,
                                        per_image=setup.task == "gcp" and setup.spec.uses_svd,
                                        relative_eps=setup.monitor_eps_relative)
    kernel = par.host_state(_find_param(state.params, setup.pre_svd_pattern))
    record["weight_norm"] = float(np.linalg.norm(np.asarray(kernel, np.float64)))
    record["olr_eta"] = _olr_eta(state.opt_state) if setup.spec.olr else None
    return record


def _summary(config: Any, workdir: str, step: int, failures: int, train_time: float,
             steps_run: int, expected_records: int) -> dict[str, Any]:
    """The summary record, from the run's history in metrics.jsonl (checked first)."""
    records = [r for r in writers.read_metrics(workdir) if r["kind"] != "summary"]
    problem = writers.history_problem(records, expected_records)
    evals = [r for r in records if r["kind"] == "eval"]
    conds = [r for r in records if r["kind"] == "conditioning"]
    last_eval = evals[-1] if evals and evals[-1]["step"] == step else None
    last_cond = conds[-1] if conds and conds[-1]["step"] == step else None
    kappa = [r["kappa_eps"] for r in conds if r.get("kappa_eps") is not None]
    whole = problem is None  # aggregates over the history need all of it
    return {
        "method": config.method, "dataset": config.dataset, "model": config.model,
        "seed": int(config.seed), "steps": int(step),
        "val_error": last_eval["error"] if last_eval else None,
        "val_examples": last_eval.get("examples") if last_eval else None,
        "cv_folds": int(config.get("cv_folds", 0)), "cv_fold": int(config.get("cv_fold", 0)),
        "best_val_error": min(r["error"] for r in evals) if evals and whole else None,
        "final_kappa_eps": last_cond["kappa_eps"] if last_cond else None,
        "median_kappa_eps": float(np.median(kappa)) if kappa and whole else None,
        "final_kappa_raw": last_cond["kappa_raw"] if last_cond else None,
        "final_singular": last_cond["singular"] if last_cond else None,
        "final_rank": last_cond["rank"] if last_cond else None,
        "dim": last_cond["dim"] if last_cond else None,
        "svd_failures": int(failures), "train_time_s": float(train_time),
        "steps_per_s": float(steps_run / train_time) if train_time > 0 else None,
        "complete": whole, "history_problem": problem,
    }


def _progress(config: Any, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    fold = f"/fold{config.cv_fold}" if config.get("cv_folds", 0) else ""
    return tqdm(total=total, initial=initial, desc=f"{config.method}/seed{config.seed}{fold}",
                dynamic_ncols=True,
                disable=not config.progress_bar or jax.process_index() > 0)


def _total_steps(config: Any, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs) * steps_per_epoch


def _steps_per_epoch(config: Any, data: input_pipeline.Data, local_batch: int) -> int:
    """Full batches per epoch; raises when the data cannot fill one (the loop would spin)."""
    steps_per_epoch = data.train.train_steps(local_batch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training split of {config.dataset!r} holds {data.train.num_examples} "
            f"examples ({jax.process_count()} process(es); config.max_train_examples="
            f"{config.max_train_examples}), fewer than one batch of {local_batch} (config."
            f"batch_size={config.batch_size}): an epoch would hold no batch")
    if data.eval.num_examples < 1:
        raise ValueError(f"the eval split of {config.dataset!r} holds no example (config."
                         f"max_eval_examples={config.max_eval_examples})")
    return steps_per_epoch


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains ``config.method`` and returns the run's summary record.

    Args:
        config: a ConfigDict like ``config.get_config()``.
        workdir: output directory (metrics.jsonl, tensorboard/, checkpoints/); an existing
            checkpoint there is resumed.

    Returns:
        The summary dict (also the last line of metrics.jsonl): method, dataset, model, seed,
        steps, val_error, val_examples (the eval split's size), cv_folds, cv_fold,
        best_val_error, final_kappa_eps, median_kappa_eps, final_kappa_raw,
        svd_failures, train_time_s, steps_per_s, complete, history_problem (+
        final_singular, final_rank, dim, compile_time_s). Timing excludes the first step
        (compilation), evaluation, monitoring and checkpointing. ``complete`` is False when
        metrics.jsonl lost records of the run: then the summary is not a result.

    Raises:
        ValueError: an invalid config (before anything is loaded or compiled), a dataset
            smaller than one batch, a batch size not divisible by the devices, a checkpoint
            past the config's last step.
        WorkdirBusyError: another run holds ``workdir``.
        CheckpointMismatchError: ``workdir`` holds checkpoints of another config.
        CheckpointAuthenticationError: a checkpoint key is set and a checkpoint's record
            does not authenticate under it (``checkpointing``, "Keyed digest").
    """
    validate_config(config)
    checkpointing.checkpoint_key(workdir)  # a bad key setting fails before anything runs
    steps.check_mode(config.parallel)
    local = _local_batch_size(config.batch_size)
    _local_batch_size(config.eval_batch_size)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(config, workdir, local)


def _resume_history(workdir: str, start: int, restored: checkpointing.Restored | None) -> int:
    """Truncates metrics.jsonl back to the checkpoint; returns the history's record count.

    Warns when records written before the checkpoint are missing (the run goes on: its
    weights are intact; its summary will say the history is incomplete).
    """
    count = restored.extra.get("metrics_records") if restored else 0
    if jax.process_index() > 0:
        return int(count or 0)
    kept = writers.truncate_metrics(workdir, start if start > 0 else -1, keep_records=count)
    count = len(kept) if count is None else int(count)
    problem = writers.history_problem(kept, count)
    if problem:
        log.warning("resuming %s from step %d: %s. Training goes on from the intact "
                    "checkpoint, but the summary will be marked incomplete (not a result); "
                    "to get a result, delete the workdir and rerun.", workdir, start, problem)
    return count


def _train(config: Any, workdir: str, local: int) -> dict[str, Any]:
    """train_and_evaluate after validation, with the workdir locked."""
    data = input_pipeline.load_data(config)
    steps_per_epoch = _steps_per_epoch(config, data, local)
    total = _total_steps(config, steps_per_epoch)
    axis_name = steps.AXIS_NAME if config.parallel == "pmap" else None
    setup = create_setup(config, num_classes=data.num_classes,
                         steps_per_epoch=steps_per_epoch, axis_name=axis_name)
    par = steps.make_parallel(config.parallel, ol_coeff=setup.ol_coeff,
                              ol_pattern=setup.pre_svd_pattern if setup.ol_coeff else None,
                              capture_stem=not setup.spec.uses_svd)
    image_shape = (data.image_size, data.image_size, 3)
    host_state = create_train_state(
        jax.random.key(config.seed, impl=config.prng_impl), setup, image_shape)
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep)
    try:
        legacy = pre_inject_layout(config, setup, checkpointing.state_arrays(host_state))
        host_state, restored = checkpointing.restore_state(ckpt, host_state, legacy=legacy)
        start = int(jax.device_get(host_state.step))
        if start > total:
            raise ValueError(f"{workdir} holds a checkpoint at step {start}, past this "
                             f"config's last step {total} (num_train_steps="
                             f"{config.num_train_steps}, num_epochs={config.num_epochs}): "
                             "the run cannot end there; use another workdir")
        writer = writers.MetricsWriter(workdir,
                                       first_seq=_resume_history(workdir, start, restored))
        state = par.place_state(host_state)
        summary = _run(config, workdir, setup, data, par, state, ckpt, writer, start, total,
                       steps_per_epoch)
        writer.close()
    finally:
        ckpt.close()
    return summary


class _Timer:
    """Training time: from the end of the first (compiling) step, minus the actions' time."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.excluded = 0.0
        self._paused_at: float | None = None

    def first_step_done(self, state: TrainState) -> float:
        """Call after the first step's dispatch; returns its time (compilation included)."""
        jax.block_until_ready(state.params)
        now = time.perf_counter()
        compile_time, self.t0, self.excluded = now - self.t0, now, 0.0
        return compile_time

    def pause(self, state: TrainState) -> None:
        """Before an action: the running step's own time still counts as training."""
        if self._paused_at is None:
            jax.block_until_ready(state.params)
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        """After a step's actions."""
        if self._paused_at is not None:
            self.excluded += time.perf_counter() - self._paused_at
            self._paused_at = None

    def train_time(self) -> float:
        return max(time.perf_counter() - self.t0 - self.excluded, 0.0)


def periodic_every_steps(config: Any, steps_per_epoch: int) -> dict[str, int]:
    """``every_steps`` of the periodic actions log, monitor, eval, checkpoint.

    Each also runs at the last step (:func:`due`); epochs count whole ``steps_per_epoch``.
    """
    return {"log": int(config.log_every_steps), "monitor": int(config.monitor_every_steps),
            "eval": int(config.eval_every_epochs) * steps_per_epoch,
            "checkpoint": int(config.checkpoint_every_epochs) * steps_per_epoch}


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action runs after ``step`` (1-based): every ``every`` steps, and
    at the ``last`` step."""
    return step % every == 0 or step == last


def _run(config: Any, workdir: str, setup: Setup, data: input_pipeline.Data,
         par: steps.Parallel, state: TrainState, ckpt: checkpointing.Checkpointer,
         writer: writers.MetricsWriter, start: int, total: int, steps_per_epoch: int
         ) -> dict[str, Any]:
    """The step loop (train, then the periodic actions) from ``start`` to ``total``."""
    batches = _train_iterator(config, data, par, start, steps_per_epoch)
    bar = _progress(config, total, start)
    postfix: dict[str, str] = {}

    def epoch_of(step: int) -> int:  # 0-based epoch of a 1-based step
        return (step - 1) // steps_per_epoch

    def log_train(step: int, state: TrainState, metrics: Any, **_: Any) -> None:
        host = par.host(metrics)
        record = writer.write(step, "train", {
            "loss": host["loss"], "accuracy": host["accuracy"],
            "learning_rate": _scalar(_learning_rate(state.opt_state)),
            "olr_eta": _olr_eta(state.opt_state) if setup.spec.olr else None,
            "svd_failures": host["svd_failures"], "epoch": epoch_of(step)})
        postfix.update(loss=f"{record['loss']:.3f}" if record["loss"] is not None
                       else "nan", acc=f"{record['accuracy']:.3f}",
                       fail=str(record["svd_failures"]))

    def monitor_features(step: int, state: TrainState, batch: dict,
                         **_: Any) -> None:
        cond = writer.write(step, "conditioning", conditioning_record(setup, par, state, batch))
        postfix["kappa"] = monitor.format_kappa(cond)

    def evaluate_state(step: int, state: TrainState, **_: Any) -> None:
        ev = evaluate(config, data, par, state)
        writer.write(step, "eval", {**ev, "epoch": epoch_of(step)})
        postfix["val_err"] = f"{ev['error']:.2f}"

    def save_checkpoint(step: int, state: TrainState, **_: Any) -> None:
        checkpointing.save_state(ckpt, par.host_state(state),
                                 extra={"metrics_records": writer.count})

    timer = _Timer()

    every = periodic_every_steps(config, steps_per_epoch)
    actions = ((every["log"], log_train), (every["monitor"], monitor_features),
               (every["eval"], evaluate_state), (every["checkpoint"], save_checkpoint))
    compile_time = 0.0
    for step in range(start, total):
        batch = next(batches)
        state, step_metrics = par.train_step(state, batch)
        if step == start:  # exclude compilation from the training time
            compile_time = timer.first_step_done(state)
        for period, action in actions:
            if due(step + 1, period, total):
                timer.pause(state)  # the actions' time is not training time
                action(step + 1, state=state, batch=batch, metrics=step_metrics)
        timer.resume()
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
    jax.block_until_ready(state)
    bar.close()
    train_time = timer.train_time()
    failures = int(jax.device_get(par.host_state(state).svd_failures))
    summary = None
    if jax.process_index() == 0:  # the only process that wrote (and may read) the history
        summary = _summary(config, workdir, total, failures, train_time,
                           max(total - start - 1, 0), writer.count)
        summary["compile_time_s"] = compile_time
        if not summary["complete"]:
            log.warning("%s: the run's history is incomplete (%s); its summary is not a "
                        "result (complete: false). Delete the workdir and rerun to get one.",
                        workdir, summary["history_problem"])
    summary = _from_process_0(summary)
    writer.write(total, "summary", summary)
    return summary


def _from_process_0(value: dict[str, Any] | None) -> dict[str, Any]:
    """Process 0's JSON-ready ``value`` on every process (a broadcast; the value itself with
    one process)."""
    if jax.process_count() == 1:
        assert value is not None
        return value
    from jax.experimental import multihost_utils

    data = (np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0
            else np.zeros(0, np.uint8))
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[:data.size] = data
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))))
