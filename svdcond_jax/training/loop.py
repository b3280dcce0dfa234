"""``train_and_evaluate(config, workdir)``: the training loop, composed of small functions.

One run: load data (exits at once if a TFDS dataset is missing) -> build model/optimizer
from the method name -> restore the latest checkpoint of ``workdir`` if any -> for each step:
place a batch on the devices, run the compiled step (non-finite steps are skipped and
counted), log train records, every ``monitor_every_steps`` the float64 conditioning record;
per epoch evaluate and checkpoint -> summary record. Outputs in ``workdir``:
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``.

Exact resume: the data order and augmentation are functions of (seed, epoch, position), and
the checkpoint holds the whole array state, so a run restarted from its last checkpoint ends
with the same parameters as an uninterrupted one (``metrics.jsonl`` is truncated back to the
checkpoint's step and continued). ``train_time_s`` counts this process's run only.

Multi-host: call :func:`initialize_distributed` (``jax.distributed.initialize()``) at the
start of the program, before any other jax call; each process then reads its share of the
data (``jax.process_index/process_count`` in the input pipeline) and the steps run over the
global mesh. Only process 0 writes metrics; the conditioning monitor reads the features
addressable by process 0. This cannot be tested here beyond one process.

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
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from svdcond_jax.optimizers import find_olr_eta
from svdcond_jax.training import checkpointing, input_pipeline, monitor, steps, writers
from svdcond_jax.training.state import Setup, TrainState, create_setup, create_train_state
from svdcond_jax.training.state import find_param as _find_param


def initialize_distributed() -> None:
    """Multi-host setup: ``jax.distributed.initialize()`` (a no-op for one process).

    On a cluster with a coordinator (Cloud TPU, SLURM, or the JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID environment) this connects the processes; call it
    first thing in ``main``. Untested here (one process only).
    """
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError):  # not in a multi-process environment
        pass


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


def evaluate(config: Any, data: input_pipeline.Data, par: steps.Parallel,
             state: TrainState) -> dict[str, float]:
    """Loss, accuracy and error (%) over the whole eval split."""
    local = _local_batch_size(config.eval_batch_size)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in input_pipeline.eval_batches(data, batch_size=local):
        sums = par.host(par.eval_step(state, par.place_batch(batch)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    count = max(totals["count"], 1.0)
    accuracy = totals["correct"] / count
    return {"loss": totals["loss_sum"] / count, "accuracy": accuracy,
            "error": 100.0 * (1.0 - accuracy)}


def _olr_eta(opt_state: Any) -> float | None:
    """OLR's last eta as a float; reads one scalar (a pmap state's first replica)."""
    eta = find_olr_eta(opt_state)
    return None if eta is None else float(np.asarray(eta).reshape(-1)[0])


def _addressable(x: jax.Array) -> np.ndarray:
    """This process's part of a (possibly multi-host sharded) array, on the host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards if s.replica_id == 0])


def conditioning_record(setup: Setup, par: steps.Parallel, state: TrainState,
                        batch: dict) -> dict[str, Any]:
    """Float64 conditioning of the Pre-SVD output on ``batch`` + weight norm + OLR eta."""
    feats = _addressable(par.features_step(state, batch))
    record = monitor.conditioning_stats(feats, eps=setup.monitor_eps,
                                        per_image=setup.task == "gcp" and setup.spec.uses_svd)
    kernel = par.host_state(_find_param(state.params, setup.pre_svd_pattern))
    record["weight_norm"] = float(np.linalg.norm(np.asarray(kernel, np.float64)))
    record["olr_eta"] = _olr_eta(state.opt_state) if setup.spec.olr else None
    return record


def _summary(config: Any, workdir: str, step: int, failures: int, train_time: float,
             steps_run: int) -> dict[str, Any]:
    evals = writers.read_metrics(workdir, "eval")
    conds = writers.read_metrics(workdir, "conditioning")
    kappa = [r["kappa_eps"] for r in conds if r["kappa_eps"] is not None]
    return {
        "method": config.method, "dataset": config.dataset, "model": config.model,
        "seed": int(config.seed), "steps": int(step),
        "val_error": evals[-1]["error"] if evals else None,
        "best_val_error": min(r["error"] for r in evals) if evals else None,
        "final_kappa_eps": conds[-1]["kappa_eps"] if conds else None,
        "median_kappa_eps": float(np.median(kappa)) if kappa else None,
        "final_kappa_raw": conds[-1]["kappa_raw"] if conds else None,
        "final_singular": conds[-1]["singular"] if conds else None,
        "final_rank": conds[-1]["rank"] if conds else None,
        "dim": conds[-1]["dim"] if conds else None,
        "svd_failures": int(failures), "train_time_s": float(train_time),
        "steps_per_s": float(steps_run / train_time) if train_time > 0 else None,
    }


def _progress(config: Any, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=config.method, dynamic_ncols=True,
                disable=not config.progress_bar or jax.process_index() > 0)


def _total_steps(config: Any, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs) * steps_per_epoch


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Trains ``config.method`` and returns the run's summary record.

    Args:
        config: a ConfigDict like ``config.get_config()``.
        workdir: output directory (metrics.jsonl, tensorboard/, checkpoints/); an existing
            checkpoint there is resumed.

    Returns:
        The summary dict (also the last line of metrics.jsonl): method, dataset, model, seed,
        steps, val_error, best_val_error, final_kappa_eps, median_kappa_eps, final_kappa_raw,
        svd_failures, train_time_s, steps_per_s (+ final_singular, final_rank, dim,
        compile_time_s). Timing excludes the first step (compilation), evaluation,
        monitoring and checkpointing.
    """
    data = input_pipeline.load_data(config)
    local = _local_batch_size(config.batch_size)
    steps_per_epoch = max(1, data.train.num_examples // local)
    total = _total_steps(config, steps_per_epoch)
    axis_name = steps.AXIS_NAME if config.parallel == "pmap" else None
    setup = create_setup(config, num_classes=data.num_classes,
                         steps_per_epoch=steps_per_epoch, axis_name=axis_name)
    par = steps.make_parallel(config.parallel, learning_rate_fn=setup.learning_rate_fn,
                              ol_coeff=setup.ol_coeff,
                              ol_pattern=setup.pre_svd_pattern if setup.ol_coeff else None,
                              capture_stem=not setup.spec.uses_svd)
    image_shape = (data.image_size, data.image_size, 3)
    host_state = create_train_state(
        jax.random.key(config.seed, impl=config.prng_impl), setup, image_shape)
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep)
    host_state = checkpointing.restore_state(ckpt, host_state)
    start = int(jax.device_get(host_state.step))
    if jax.process_index() == 0:  # drop records written after the checkpoint (or all)
        writers.truncate_metrics(workdir, start if start > 0 else -1)
    writer = writers.MetricsWriter(workdir)
    state = par.place_state(host_state)
    summary = _run(config, workdir, setup, data, par, state, ckpt, writer, start, total,
                   steps_per_epoch)
    writer.close()
    ckpt.close()
    return summary


def _run(config: Any, workdir: str, setup: Setup, data: input_pipeline.Data,
         par: steps.Parallel, state: TrainState, ckpt: checkpointing.Checkpointer,
         writer: writers.MetricsWriter, start: int, total: int, steps_per_epoch: int
         ) -> dict[str, Any]:
    """The step loop (train, monitor, eval, checkpoint) from ``start`` to ``total``."""
    batches = _train_iterator(config, data, par, start, steps_per_epoch)
    bar = _progress(config, total, start)
    postfix: dict[str, str] = {}
    overhead, compile_time, t0 = 0.0, 0.0, time.perf_counter()
    for step in range(start, total):
        batch = next(batches)
        state, step_metrics = par.train_step(state, batch)
        done, epoch = step + 1, step // steps_per_epoch
        last, epoch_end = done == total, done % steps_per_epoch == 0 or done == total
        is_log = done % config.log_every_steps == 0 or last
        is_mon = done % config.monitor_every_steps == 0 or last
        is_eval = epoch_end and ((epoch + 1) % config.eval_every_epochs == 0 or last)
        is_ckpt = epoch_end and ((epoch + 1) % config.checkpoint_every_epochs == 0 or last)
        if is_log or is_mon or is_eval or is_ckpt or step == start:
            jax.block_until_ready(state.params)  # the step's time counts as training
        t1 = time.perf_counter()
        if step == start:  # exclude compilation from the training time
            compile_time, overhead, t0 = t1 - t0, 0.0, t1
        if is_log:
            metrics = par.host(step_metrics)
            record = writer.write(done, "train", {
                "loss": metrics["loss"], "accuracy": metrics["accuracy"],
                "learning_rate": metrics["learning_rate"],
                "olr_eta": _olr_eta(state.opt_state) if setup.spec.olr else None,
                "svd_failures": metrics["svd_failures"], "epoch": epoch})
            postfix.update(loss=f"{record['loss']:.3f}" if record["loss"] is not None
                           else "nan", acc=f"{record['accuracy']:.3f}",
                           fail=str(record["svd_failures"]))
        if is_mon:
            cond = writer.write(done, "conditioning",
                                conditioning_record(setup, par, state, batch))
            postfix["kappa"] = monitor.format_kappa(cond)
        if is_eval:
            ev = evaluate(config, data, par, state)
            writer.write(done, "eval", {**ev, "epoch": epoch})
            postfix["val_err"] = f"{ev['error']:.2f}"
        if is_ckpt:
            checkpointing.save_state(ckpt, par.host_state(state))
        overhead += time.perf_counter() - t1
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
    jax.block_until_ready(state)
    bar.close()
    train_time = max(time.perf_counter() - t0 - overhead, 0.0)
    failures = int(jax.device_get(par.host_state(state).svd_failures))
    summary = _summary(config, workdir, total, failures, train_time, max(total - start - 1, 0))
    summary["compile_time_s"] = compile_time
    writer.write(total, "summary", summary)
    return summary
