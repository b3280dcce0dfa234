"""Model, learning-rate schedule, optimizer and train state of one run.

The optimizer (``pre_svd_sgd`` for the paper's SGD; AdamW, optax.contrib.muon or
``nog_optimizer`` for the other ``config.optimizer`` values, :func:`create_optimizer`) is
wrapped in ``optax.inject_hyperparams``: the learning rate the optimizer used at the last
update is in the optimizer state (:func:`learning_rate`), so the loop logs the value that
was applied instead of re-evaluating the schedule.

Example:
    >>> import jax
    >>> from svdcond_jax.training.config import get_config
    >>> from svdcond_jax.training import state as state_lib
    >>> config = get_config()
    >>> setup = state_lib.create_setup(config, num_classes=10, steps_per_epoch=10)
    >>> st = state_lib.create_train_state(jax.random.key(0), setup, image_shape=(16, 16, 3))
    >>> int(st.step), int(st.svd_failures)
    (0, 0)
    >>> round(float(state_lib.learning_rate(st.opt_state)), 6)
    0.1
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from optax.contrib import MuonDimensionNumbers

from svdcond_jax import models
from svdcond_jax._paths import path_str
from svdcond_jax.optimizers import (
    DEFAULT_EXCLUDE,
    DEFAULT_SELECT,
    check_olr_placement,
    nog_optimizer,
    pre_svd_mask,
    pre_svd_optimizer,
    pre_svd_sgd,
)
from svdcond_jax.training.methods import (
    MethodSpec,
    model_options,
    parse_method,
    resolve_optimizer,
    resolve_task,
)

STEM_PATTERN = r"^stem_conv/kernel$"  # monitored layer of "bn" (no Pre-SVD layer)


class TrainState(train_state.TrainState):
    """flax TrainState plus BatchNorm/DBN statistics and the SVD-failure counter."""

    batch_stats: Any
    svd_failures: jax.Array  # () int32: steps skipped because something was non-finite


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run derives from its config before touching data or devices."""

    spec: MethodSpec
    task: str  # "dbn" | "gcp"
    model: nn.Module
    learning_rate_fn: optax.Schedule
    tx: optax.GradientTransformation
    pre_svd_pattern: str  # regex of the Pre-SVD kernel (bn: the stem conv, monitored only)
    monitor_eps: float  # eps*I of the monitored covariance
    monitor_eps_relative: bool  # the layer adds monitor_eps * trace(P) / d instead
    ol_coeff: float  # 0 unless the method has "+ol"
    # jax.jit(model.init) as (rng, images) -> variables: one per setup, so the seeds of a
    # sweep (which share the setup) compile it once; it retraces per image shape itself.
    init: Callable[[jax.Array, jax.Array], Any]


def create_learning_rate_fn(config: Any, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant schedule: ``lr * lr_decay**k`` after the k-th boundary epoch.

    Step-based (boundaries at ``epoch * steps_per_epoch``), as the paper's recipe (lr 0.1,
    /10 every 100 epochs; epochs 30/45 for GCP; docs/applications.md).

    Args:
        config: reads learning_rate, lr_boundaries_epochs, lr_decay.
        steps_per_epoch: optimizer steps per epoch.

    Returns:
        An optax schedule ``step -> lr``.
    """
    boundaries = {int(e) * steps_per_epoch: float(config.lr_decay)
                  for e in config.lr_boundaries_epochs}
    return optax.piecewise_constant_schedule(float(config.learning_rate), boundaries)


def create_model(config: Any, spec: MethodSpec, task: str, num_classes: int,
                 axis_name: str | None = None) -> nn.Module:
    """Instantiates ``svdcond_jax.models.<config.model>`` for a method and task.

    Args:
        config: reads model, num_filters, input_channels, half_precision, dbn_eps,
            dbn_eps_relative, dbn_groups, gcp_dim, ns_iters.
        spec: parsed method.
        task: "dbn" | "gcp".
        num_classes: classifier outputs.
        axis_name: BatchNorm/DBN axis name (set under pmap so statistics are global).

    Returns:
        The Flax module.
    """
    cls = getattr(models, config.model, None)
    if cls is None:
        raise ValueError(f"Unknown model {config.model!r} in svdcond_jax.models")
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    extra = {"num_filters": int(config.num_filters)} if config.num_filters > 0 else {}
    if config.get("input_channels", -1) > 0:
        extra["input_channels"] = int(config.input_channels)
    return cls(num_classes=num_classes, axis_name=axis_name, dtype=dtype,
               dbn_groups=int(config.dbn_groups), **extra, **model_options(spec, task, config))


_SETUPS: collections.OrderedDict[str, Setup] = collections.OrderedDict()
_SETUP_CACHE_SIZE = 16


def _setup_key(config: Any, num_classes: int, steps_per_epoch: int,
               axis_name: str | None) -> str | None:
    """The cache key of a setup: the config without ``seed`` (None: not a ConfigDict)."""
    if not hasattr(config, "to_dict"):
        return None
    fields = {k: v for k, v in config.to_dict().items() if k != "seed"}
    return json.dumps([fields, num_classes, steps_per_epoch, axis_name], sort_keys=True,
                      default=repr)


def create_setup(config: Any, *, num_classes: int, steps_per_epoch: int,
                 axis_name: str | None = None) -> Setup:
    """Builds model, schedule and optimizer (:func:`create_optimizer`) from the config.

    With ``config.optimizer="sgd"`` (the default) every method uses ``pre_svd_sgd``
    (torch-style SGD: coupled weight decay and momentum); only ``nog``/``olr`` differ, so the
    baselines share the exact same update rule.

    The same config up to ``seed`` returns the same :class:`Setup` object (the last 16 are
    kept): a seed changes parameters and data order, not the model or optimizer, so the
    runs of a sweep's seeds share their compiled steps (``steps.make_parallel`` is cached
    too, and jit's cache keys on the model and optimizer objects of the train state).
    """
    key = _setup_key(config, num_classes, steps_per_epoch, axis_name)
    if key is not None and key in _SETUPS:
        _SETUPS.move_to_end(key)
        return _SETUPS[key]
    setup = _create_setup(config, num_classes, steps_per_epoch, axis_name)
    if key is not None:
        _SETUPS[key] = setup
        while len(_SETUPS) > _SETUP_CACHE_SIZE:
            _SETUPS.popitem(last=False)
    return setup


def _create_setup(config: Any, num_classes: int, steps_per_epoch: int,
                  axis_name: str | None) -> Setup:
    spec = parse_method(config.method)
    task = resolve_task(config.task, config.dataset)
    model = create_model(config, spec, task, num_classes, axis_name)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch)
    if spec.uses_svd:
        pattern, eps = models.pre_svd_pattern(model), models.pre_svd_eps(model)
    else:
        pattern, eps = STEM_PATTERN, float(config.dbn_eps)
    tx = create_optimizer(config, spec, lr_fn, pattern)
    ol_coeff = float(config.ol_coeff) if spec.ol else 0.0
    init = jax.jit(lambda rng, images: model.init(rng, images, train=False))
    relative = bool(config.dbn_eps_relative) and task == "dbn"
    return Setup(spec, task, model, lr_fn, tx, pattern, eps, relative, ol_coeff, init)


def _inject(factory: Callable[..., optax.GradientTransformation],
            learning_rate: optax.ScalarOrSchedule, **kwargs: Any
            ) -> optax.GradientTransformation:
    """``optax.inject_hyperparams(factory)`` with only ``learning_rate`` injected.

    Every other argument stays a Python value: inject_hyperparams would take a callable
    selection for a schedule, and static momentum/weight decay keep the optimizer state (and
    the checkpoints) to the one scheduled value.
    """
    static = tuple(n for n in inspect.signature(factory).parameters if n != "learning_rate")
    return optax.inject_hyperparams(factory, static_args=static)(learning_rate, **kwargs)


def _scaled(schedule: optax.Schedule, factor: float) -> optax.Schedule:
    """The schedule times ``factor``: another base rate with the same decay."""
    return lambda step: schedule(step) * factor


def muon_dimension_numbers(params: Any) -> Any:
    """optax.contrib.muon's reshape of every conv/dense kernel but the head (the matrices of
    ``nog_optimizer``'s default selection): reduce over all axes but the last, the
    ``(kh*kw*in, out)`` matrix of an HWIO kernel; None (AdamW) for the other leaves."""
    select, exclude = re.compile(DEFAULT_SELECT), re.compile(DEFAULT_EXCLUDE)

    def spec(path: tuple[Any, ...], x: Any) -> MuonDimensionNumbers | None:
        name = path_str(path)
        if x.ndim >= 2 and select.search(name) and not exclude.search(name):
            return MuonDimensionNumbers(tuple(range(x.ndim - 1)), x.ndim - 1)
        return None

    return jax.tree_util.tree_map_with_path(spec, params)


def _adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float, pre_svd: str,
           pre_svd_learning_rate: optax.ScalarOrSchedule, nog: bool, olr: bool,
           momentum: float, pre_svd_weight_decay: float) -> optax.GradientTransformation:
    """AdamW; with nog/olr, next to the paper's Pre-SVD SGD (OLR's cap: the SGD rate)."""
    rest = optax.adamw(learning_rate, weight_decay=weight_decay)
    if not (nog or olr):
        return rest
    return pre_svd_optimizer(pre_svd_learning_rate, pre_svd, rest=rest, nog=nog, olr=olr,
                             momentum=momentum, weight_decay=pre_svd_weight_decay)


def _muon(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float,
          adam_learning_rate: optax.ScalarOrSchedule, adam_weight_decay: float
          ) -> optax.GradientTransformation:
    """optax.contrib.muon on every conv/dense kernel but the head, AdamW for the rest."""
    return optax.contrib.muon(learning_rate, weight_decay=weight_decay,
                              adam_learning_rate=adam_learning_rate,
                              adam_weight_decay=adam_weight_decay,
                              muon_weight_dimension_numbers=muon_dimension_numbers)


def create_optimizer(config: Any, spec: MethodSpec, learning_rate_fn: optax.Schedule,
                     pattern: str) -> optax.GradientTransformation:
    """The run's optimizer with its learning-rate schedule injected.

    By ``methods.resolve_optimizer(spec, config.optimizer)``:

    * ``sgd``: ``pre_svd_sgd`` (the paper's torch-style SGD, NOG/OLR on the Pre-SVD kernel
      as the method says);
    * ``adamw``: ``optax.adamw(adamw_learning_rate, weight_decay=adamw_weight_decay)``; with
      ``+nog``/``+olr`` next to the paper's Pre-SVD SGD (``pre_svd_optimizer``, OLR capped
      by the SGD ``learning_rate`` schedule);
    * ``muon``: ``optax.contrib.muon(muon_learning_rate, weight_decay=muon_weight_decay)``
      on every conv/dense kernel but the head (:func:`muon_dimension_numbers`), its AdamW
      (``adamw_learning_rate``, ``adamw_weight_decay``) for the rest;
    * ``nog`` / ``nog+olr``: ``nog_optimizer(learning_rate, olr=..., momentum,
      weight_decay, polar_method)`` (the paper's conventions, SGD for the rest).

    Every rate follows ``learning_rate_fn``'s decay, scaled to its own base rate; the
    injected (logged) rate is AdamW's for ``adamw``, Muon's for ``muon``, the SGD one
    otherwise. The result is checked with ``check_olr_placement``.

    Args:
        config: reads learning_rate, momentum, weight_decay, optimizer and the adamw_*,
            muon_* and polar_method fields.
        spec: parsed method (nog, olr, optimizer).
        learning_rate_fn: the SGD schedule (evaluated by inject_hyperparams at its count).
        pattern: regex of the Pre-SVD parameter.

    Returns:
        The optimizer; :func:`learning_rate` reads the applied rate from its state and
        :func:`svdcond_jax.find_olr_eta` finds OLR's eta inside it.
    """
    optimizer = resolve_optimizer(spec, config.optimizer)
    momentum, weight_decay = float(config.momentum), float(config.weight_decay)

    def rate(base: float) -> optax.Schedule:
        return _scaled(learning_rate_fn, float(base) / float(config.learning_rate))

    if optimizer == "sgd":
        tx = _inject(pre_svd_sgd, learning_rate_fn, pre_svd=pattern, momentum=momentum,
                     weight_decay=weight_decay, nog=spec.nog, olr=spec.olr)
    elif optimizer == "adamw":
        tx = _inject(_adamw, rate(config.adamw_learning_rate),
                     weight_decay=float(config.adamw_weight_decay), pre_svd=pattern,
                     pre_svd_learning_rate=learning_rate_fn, nog=spec.nog, olr=spec.olr,
                     momentum=momentum, pre_svd_weight_decay=weight_decay)
    elif optimizer == "muon":
        tx = _inject(_muon, rate(config.muon_learning_rate),
                     weight_decay=float(config.muon_weight_decay),
                     adam_learning_rate=rate(config.adamw_learning_rate),
                     adam_weight_decay=float(config.adamw_weight_decay))
    else:  # "nog" | "nog+olr"
        tx = _inject(nog_optimizer, learning_rate_fn, olr=optimizer == "nog+olr",
                     momentum=momentum, weight_decay=weight_decay,
                     polar_method=str(config.polar_method))
    return check_olr_placement(tx)


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the last update (before any: the first one) from the state.

    A skipped (non-finite) step keeps the old optimizer state, so this is the rate the
    optimizer last applied; the schedule advances with the applied updates.
    """
    return opt_state.hyperparams["learning_rate"]


def pre_inject_layout(config: Any, setup: Setup, arrays: dict[str, Any]
                      ) -> tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]] | None:
    """Checkpoint layout of the earlier optimizer (no inject_hyperparams) and its conversion.

    Only the SGD optimizer existed before the wrapping; for the others this is None.

    Checkpoints written before the optimizer was wrapped hold ``opt_state`` = the state of
    ``pre_svd_sgd(schedule, ...)`` (which also keeps a schedule count). Every leaf of the
    wrapped optimizer's inner state is taken from the leaf at the same tree path there; the
    wrapper's count is the number of applied updates, ``step - svd_failures`` (a skipped
    step keeps the optimizer state), and its learning rate the schedule's value at the last
    of them.

    Args:
        config: reads momentum, weight_decay.
        setup: the run's setup (schedule, Pre-SVD pattern, method).
        arrays: the current saved arrays (``checkpointing.state_arrays``), the target.

    Returns:
        (target in the earlier layout, function converting a restored tree to ``arrays``'),
        or None when the run's optimizer is not SGD.
    """
    if resolve_optimizer(setup.spec, config.optimizer) != "sgd":
        return None
    earlier_tx = pre_svd_sgd(setup.learning_rate_fn, setup.pre_svd_pattern,
                             momentum=float(config.momentum),
                             weight_decay=float(config.weight_decay), nog=setup.spec.nog,
                             olr=setup.spec.olr)
    wrapped = arrays["opt_state"]
    earlier = {**arrays, "opt_state": earlier_tx.init(arrays["params"])}

    def convert(tree: dict[str, Any]) -> dict[str, Any]:
        old = {jax.tree_util.keystr(p): x
               for p, x in jax.tree_util.tree_leaves_with_path(tree["opt_state"])}
        inner = jax.tree_util.tree_map_with_path(
            lambda p, _: old[jax.tree_util.keystr(p)], wrapped.inner_state)
        # One new array per leaf: a state whose leaves share a buffer cannot be donated to
        # the compiled step (XLA would receive the same buffer twice).
        def count() -> jax.Array:
            return jnp.array(tree["step"] - tree["svd_failures"], wrapped.count.dtype)

        lr = setup.learning_rate_fn(jnp.maximum(count() - 1, 0))
        hyper = {"learning_rate": jnp.array(lr, learning_rate(wrapped).dtype)}
        states = jax.tree_util.tree_map(lambda _: count(), wrapped.hyperparams_states)
        opt_state = wrapped._replace(count=count(), hyperparams=hyper,
                                     hyperparams_states=states, inner_state=inner)
        return {**tree, "opt_state": opt_state}

    return earlier, convert


def find_param(params: Any, pattern: str) -> jax.Array:
    """The single parameter whose '/'-joined path matches ``pattern`` (ValueError otherwise).

    Selection as in the optimizer (:func:`svdcond_jax.pre_svd_mask`), which raises with the
    available paths when nothing matches.
    """
    mask = pre_svd_mask(params, pattern)
    found = [leaf for leaf, selected in zip(jax.tree_util.tree_leaves(params),
                                            jax.tree_util.tree_leaves(mask), strict=True)
             if selected]
    if len(found) != 1:
        raise ValueError(f"pattern {pattern!r} matches {len(found)} parameters, expected 1")
    return found[0]


def create_train_state(rng: jax.Array, setup: Setup, image_shape: tuple[int, int, int]
                       ) -> TrainState:
    """Initialises parameters, statistics and optimizer state (unreplicated, on host).

    Args:
        rng: PRNG key.
        setup: from :func:`create_setup`.
        image_shape: (H, W, C) of one input image.

    Returns:
        A :class:`TrainState` at step 0.
    """
    variables = setup.init(rng, jnp.zeros((2, *image_shape)))
    params = variables["params"]
    find_param(params, setup.pre_svd_pattern)  # fail loudly on a bad selection
    return TrainState.create(apply_fn=setup.model.apply, params=params, tx=setup.tx,
                             batch_stats=variables.get("batch_stats", {}),
                             svd_failures=jnp.zeros((), jnp.int32))
