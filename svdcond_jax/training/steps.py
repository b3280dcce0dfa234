"""Train / eval / feature steps, and how they are compiled: jit over a Mesh, or pmap.

The step functions are written once, for one (global or per-device) batch. ``axis_name``
is None under ``jax.jit`` (the batch is a global array sharded on the mesh axis "data",
parameters are replicated, and XLA inserts the collectives; BatchNorm/DBN statistics are
global because the mean is over the global batch), and "batch" under ``jax.pmap`` (the model
is built with ``axis_name="batch"`` so BatchNorm/DBN average their moments over devices, and
the step ``pmean``s gradients and metrics).

Failure accounting (the paper's Table 5 "SVD failures"): a step whose loss, gradient, new
batch statistics or new parameters are non-finite (e.g. NaN out of an eigendecomposition's
backward) is skipped: every leaf of params, opt_state and batch_stats keeps its old value
(``jnp.where`` on one global finite flag), ``svd_failures`` is incremented and ``step``
still advances (the schedule moves on, as in the reference's skip-on-NaN training). The
layers' own guard (decorrelated BN and covariance pooling keep their running statistics on
a non-finite batch and count it in ``batch_stats`` ``nonfinite_batches``) is then moot: the
skipped step restores the whole of ``batch_stats``, counters included, so in this library
the counters stay 0 and ``svd_failures`` is the count.

Example:
    >>> from svdcond_jax.training import steps
    >>> steps.cross_entropy_loss  # doctest: +ELLIPSIS
    <function cross_entropy_loss at ...>
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from svdcond_jax.orthogonal import orthogonality_loss
from svdcond_jax.training.state import TrainState, find_param

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
AXIS_NAME = "batch"  # pmap axis name (and the model's axis_name under pmap)
MESH_AXIS = "data"  # mesh axis the batch is sharded on under jit


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross entropy with integer labels, shape (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(flag: jax.Array, new: Any, old: Any) -> Any:
    """``new`` if ``flag`` else ``old``, as ONE ``lax.cond`` over the whole tree.

    Not ``jnp.where`` per leaf: XLA then fuses the scalar flag (an AND of one reduction per
    leaf) into every leaf's select, duplicating that chain once per leaf; for the CIFAR
    ResNet-50 (~600 leaves) that was 90% of the optimised HLO (561k lines) and most of its
    compile time (measured: docs/performance.md). The cond's predicate is computed once.
    """
    return jax.lax.cond(flag, lambda: new, lambda: old)


def train_step(state: TrainState, batch: Batch, *,
               learning_rate_fn: optax.Schedule | None = None,
               ol_coeff: float = 0.0, ol_pattern: str | None = None,
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
    """One SGD step with non-finite skipping.

    Objective: mean cross entropy + ``ol_coeff * ||W W^T - I||_F`` (Eq. 12) of the Pre-SVD
    kernel when ``ol_coeff > 0``. Weight decay is in the optimizer (``pre_svd_sgd``).

    Args:
        state: current state (replicated).
        batch: ``{"image": (B, H, W, C), "label": (B,)}`` (per device under pmap).
        learning_rate_fn: optional schedule, evaluated at ``state.step`` for the metrics
            only (the loop reads the applied rate from the optimizer state instead).
        ol_coeff: orthogonality-loss weight (0 = off).
        ol_pattern: regex of the Pre-SVD kernel for the orthogonality loss.
        axis_name: pmap axis name, or None under jit.

    Returns:
        ``(new_state, metrics)`` with metrics loss, accuracy, finite (1.0/0.0),
        svd_failures (and learning_rate when ``learning_rate_fn`` is given).
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"])
        ce = jnp.mean(cross_entropy_loss(logits, batch["label"]))
        loss = ce
        if ol_coeff:
            loss = loss + ol_coeff * orthogonality_loss(find_param(params, ol_pattern))
        return loss, (ce, logits, updates["batch_stats"])

    grads, (ce, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
        grads, ce, accuracy = jax.lax.pmean((grads, ce, accuracy), axis_name)
    new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    finite = (_all_finite(ce) & _all_finite(grads) & _all_finite(batch_stats)
              & _all_finite(new.params) & _all_finite(new.opt_state))
    if axis_name is not None:  # one decision for all devices
        finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name).astype(bool)
    kept = _select(finite, (new.params, new.opt_state, new.batch_stats),
                   (state.params, state.opt_state, state.batch_stats))
    new = new.replace(params=kept[0], opt_state=kept[1], batch_stats=kept[2],
                      svd_failures=state.svd_failures + (~finite).astype(jnp.int32))
    metrics = {"loss": ce, "accuracy": accuracy, "finite": finite.astype(jnp.float32),
               "svd_failures": new.svd_failures}
    if learning_rate_fn is not None:
        metrics["learning_rate"] = learning_rate_fn(state.step)
    return new, metrics


def eval_step(state: TrainState, batch: Batch, *, axis_name: str | None = None) -> Metrics:
    """Sums of loss and correct predictions over the real (mask=1) examples of a batch."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=False)
    mask = batch["mask"]
    loss = cross_entropy_loss(logits, batch["label"])
    sums = {"loss_sum": jnp.sum(jnp.where(mask > 0, loss, 0.0)),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask)}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def features_step(state: TrainState, batch: Batch, *, capture_stem: bool = False) -> jax.Array:
    """The Pre-SVD output on a training batch (train mode; statistics updates discarded).

    Args:
        state: current state.
        batch: a training batch.
        capture_stem: read the ``stem_conv`` output via ``capture_intermediates`` instead of
            the sown ``pre_svd_features`` (the ``bn`` method has no SVD layer; we monitor the
            same stem conv output for comparison).

    Returns:
        NHWC features.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if capture_stem:
        _, inter = state.apply_fn(
            variables, batch["image"], train=True, mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, name: mdl.name == "stem_conv"
            and name == "__call__")
        return inter["intermediates"]["stem_conv"]["__call__"][0]
    from svdcond_jax.models import pre_svd_features

    _, inter = state.apply_fn(variables, batch["image"], train=True,
                              mutable=["batch_stats", "intermediates"])
    return pre_svd_features(inter["intermediates"])


@dataclasses.dataclass
class Parallel:
    """Compiled steps plus the placement functions of one parallel mode.

    ``place_state``/``place_batch`` put host values onto the devices; ``host_state`` brings
    one unreplicated copy back (checkpoints, monitor); ``host`` converts step outputs.
    """

    mode: str
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    eval_step: Callable[[TrainState, Batch], Metrics]
    features_step: Callable[[TrainState, Batch], jax.Array]
    place_state: Callable[[TrainState], TrainState]
    place_batch: Callable[[Batch], Batch]
    host_state: Callable[[TrainState], TrainState]
    host: Callable[[Any], Any]


def create_mesh() -> Mesh:
    """1-D mesh over all devices (all processes), axis "data", Auto axis type.

    ``jax.make_mesh`` defaults to Explicit axes; ``Mesh`` keeps Auto, so
    replicated/sharded inputs placed with ``NamedSharding`` need no annotations.
    """
    return Mesh(np.asarray(jax.devices()), (MESH_AXIS,))


def check_mode(mode: str) -> None:
    """Refuses an unknown parallel mode, and "pmap" when ``jax.process_count() > 1``.

    pmap's arrays are host-local: its replicated state cannot be checkpointed by orbax
    across processes, and its batch statistics would only average over one host's devices.

    Args:
        mode: ``config.parallel``.

    Raises:
        ValueError: naming ``config.parallel`` and the alternative.

    Example:
        >>> check_mode("jit")
    """
    if mode not in ("jit", "pmap"):
        raise ValueError(f"config.parallel={mode!r}; valid: 'jit', 'pmap'")
    if mode == "pmap" and jax.process_count() > 1:
        raise ValueError(
            f"config.parallel='pmap' cannot run on {jax.process_count()} processes (its "
            "arrays are per-host: checkpoints and batch statistics would not span the "
            "processes); use config.parallel='jit' (jit over a Mesh of every process's "
            "devices), the multi-process path. See docs/distributed.md.")


@functools.lru_cache(maxsize=16)
def make_parallel(mode: str, *, learning_rate_fn: optax.Schedule | None = None,
                  ol_coeff: float, ol_pattern: str | None, capture_stem: bool) -> Parallel:
    """Compiles the steps for ``mode`` "jit" (Mesh + NamedSharding) or "pmap".

    Multi-process (docs/distributed.md): "jit" is the path; each process passes its rows
    of the global batch and ``jax.make_array_from_process_local_data`` assembles the global
    array on the mesh over every process's devices (``jax.distributed.initialize()`` first,
    see ``training.distributed.initialize``). "pmap" is refused there.

    Cached (the last 16 argument combinations): the same arguments return the same jitted
    functions, so runs that differ only in their seed (same ``state.create_setup`` object,
    hence the same train-state structure) compile each step once per process.

    Raises:
        ValueError: an unknown ``mode``, or "pmap" with several processes (see
            :func:`check_mode`).
    """
    check_mode(mode)
    kw = {"learning_rate_fn": learning_rate_fn, "ol_coeff": ol_coeff, "ol_pattern": ol_pattern}
    feats = functools.partial(features_step, capture_stem=capture_stem)
    if mode == "jit":
        return _make_jit(kw, feats)
    return _make_pmap(kw, feats)


def _make_jit(kw: dict[str, Any], feats: Callable) -> Parallel:
    mesh = create_mesh()
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(MESH_AXIS))
    train = jax.jit(functools.partial(train_step, **kw), in_shardings=(repl, data),
                    out_shardings=(repl, repl), donate_argnums=0)
    ev = jax.jit(eval_step, in_shardings=(repl, data), out_shardings=repl)
    # Replicated output: every process holds the features of the whole global batch, so the
    # conditioning monitor reads the same numbers as in one process.
    fe = jax.jit(feats, in_shardings=(repl, data), out_shardings=repl)

    def place_batch(batch: Batch) -> Batch:
        return {k: jax.make_array_from_process_local_data(data, np.asarray(v))
                for k, v in batch.items()}

    return Parallel("jit", train, ev, fe, lambda s: jax.device_put(s, repl), place_batch,
                    lambda s: s, jax.device_get)


def _make_pmap(kw: dict[str, Any], feats: Callable) -> Parallel:
    n = jax.local_device_count()
    train = jax.pmap(functools.partial(train_step, axis_name=AXIS_NAME, **kw),
                     axis_name=AXIS_NAME, donate_argnums=0)
    ev = jax.pmap(functools.partial(eval_step, axis_name=AXIS_NAME), axis_name=AXIS_NAME)
    fe = jax.pmap(feats, axis_name=AXIS_NAME)

    def place_state(s: TrainState) -> TrainState:
        stacked = jax.tree_util.tree_map(
            lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), s)
        return jax.pmap(lambda t: t, axis_name=AXIS_NAME)(stacked)  # = the steps' outputs

    # pmap's own placement of a mapped axis: NamedSharding over the local devices.
    local = NamedSharding(Mesh(np.asarray(jax.local_devices()), (AXIS_NAME,)), P(AXIS_NAME))

    def place_batch(batch: Batch) -> Batch:
        return {k: jax.device_put(np.asarray(v).reshape(n, -1, *np.shape(v)[1:]), local)
                for k, v in batch.items()}

    def host_state(s: TrainState) -> TrainState:
        return jax.tree_util.tree_map(lambda x: x[0], s)

    def host(x: Any) -> Any:
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[0], jax.device_get(x))

    return Parallel("pmap", train, ev, fe, place_state, place_batch, host_state, host)
