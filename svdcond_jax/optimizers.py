"""Optimizer recipes with NOG and OLR, composed from optax pieces.

* :func:`pre_svd_sgd` reproduces torch.optim.SGD (coupled L2 weight decay, momentum with
  dampening 0, then the learning rate) on every parameter, with the Nearest Orthogonal
  Gradient applied to the raw gradient of the Pre-SVD parameter and the Optimal Learning
  Rate replacing its learning rate (docs/nog_olr.md), the paper's setting.
* :func:`pre_svd_optimizer` is the same Pre-SVD treatment next to any optax optimizer for
  the other parameters (``rest=optax.adamw(1e-3)``), with OLR's cap given explicitly.
* :func:`nog_optimizer` puts NOG (and OLR per layer) on every conv and dense kernel, the
  classifier head excluded, with the paper's conventions or optax.contrib.muon's.
* :func:`check_olr_placement` refuses a composition that feeds OLR an already-scaled update.

The Pre-SVD selection (:func:`pre_svd_mask`) is explicit, is written the same way for Flax
Linen and Flax NNX (``r"^stem_conv/kernel$"``), and fails loudly when it matches nothing (the
authors' release silently matched no parameter after ``DataParallel`` renamed them,
docs/reference_code.md).

The same optimizer from the public pieces, for a Flax Linen model (``pre_svd_labels`` names
the Pre-SVD kernel ``"pre_svd"`` and every other parameter ``"other"``):

>>> import jax, jax.numpy as jnp, optax
>>> import flax.linen as nn
>>> import svdcond_jax as sc
>>> class Net(nn.Module):
...     @nn.compact
...     def __call__(self, x):
...         x = nn.relu(nn.Conv(8, (3, 3), use_bias=False, name="stem_conv")(x))
...         return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))
>>> model = Net()
>>> x, y = jax.random.normal(jax.random.key(1), (4, 8, 8, 3)), jnp.arange(4)
>>> params = model.init(jax.random.key(0), x)["params"]
>>> lr, wd = optax.cosine_decay_schedule(0.1, 1000), 5e-4
>>> tx = optax.partition(
...     {"pre_svd": optax.chain(sc.nearest_orthogonal_gradient(),
...                             sc.optimal_learning_rate(lr, momentum=0.9, weight_decay=wd)),
...      "other": optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))},
...     sc.pre_svd_labels(r"^stem_conv/kernel$"))
>>> opt_state = tx.init(params)
>>> def loss_fn(params):
...     logits = model.apply({"params": params}, x)
...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
>>> @jax.jit
... def train_step(params, opt_state):
...     loss, grads = jax.value_and_grad(loss_fn)(params)
...     updates, opt_state = tx.update(grads, opt_state, params)
...     return optax.apply_updates(params, updates), opt_state, loss
>>> params, opt_state, loss0 = train_step(params, opt_state)
>>> params, opt_state, loss1 = train_step(params, opt_state)
>>> bool(loss1 < loss0), float(sc.find_olr_eta(opt_state)) > 0
(True, True)

``sc.pre_svd_sgd(lr, r"^stem_conv/kernel$", momentum=0.9, weight_decay=5e-4, nog=True,
olr=True)`` builds the same transformation. With Flax NNX, ``nnx.Optimizer`` passes the
parameters to ``tx.update`` (OLR needs them), and the selection is spelled as for Linen:

>>> from flax import nnx
>>> class NnxNet(nnx.Module):
...     def __init__(self, rngs):
...         self.stem_conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
...         self.bn = nnx.BatchNorm(8, rngs=rngs)
...         self.head = nnx.Linear(8, 10, rngs=rngs)
...     def __call__(self, x):
...         x = nnx.relu(self.bn(self.stem_conv(x)))
...         return self.head(x.mean(axis=(1, 2)))
>>> model = NnxNet(nnx.Rngs(0))
>>> tx = sc.pre_svd_sgd(0.1, r"^stem_conv/kernel$", momentum=0.9, weight_decay=5e-4,
...                     nog=True, olr=True)
>>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
>>> @nnx.jit
... def nnx_step(model, optimizer, x, y):
...     def loss_fn(model):
...         return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
...     loss, grads = nnx.value_and_grad(loss_fn)(model)
...     optimizer.update(model, grads)
...     return loss
>>> loss0, loss1 = nnx_step(model, optimizer, x, y), nnx_step(model, optimizer, x, y)
>>> bool(loss1 < loss0), float(sc.find_olr_eta(optimizer.opt_state)) > 0
(True, True)

An NNX path filter selects too: ``sc.pre_svd_sgd(0.1, nnx.PathContains("stem_conv"), ...)``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import filterlib

from svdcond_jax._paths import is_variable, key_of, leaves_with_paths, path_str, unwrap
from svdcond_jax.transforms import (
    OptimalLearningRateState,
    _check_float_leaves,
    _check_sgd_hyperparams,
    _descent_scale,
    ema_momentum,
    nearest_orthogonal_gradient,
    optimal_learning_rate,
    scale_by_shape,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_SELECT",
    "PreSvdSelection",
    "check_olr_placement",
    "find_olr_eta",
    "nog_labels",
    "nog_mask",
    "nog_optimizer",
    "pre_svd_labels",
    "pre_svd_mask",
    "pre_svd_optimizer",
    "pre_svd_sgd",
]

PreSvdSelection = str | Callable[[str, Any], bool] | Any
"""A regex (``re.search`` on '/'-joined paths), an NNX path filter, a callable
``(path, leaf) -> bool`` or a pytree of bools with the params' structure."""

# NNX filters that look at the path only. nnx.Optimizer hands tx.update bare arrays, so a
# filter on the Variable's type or tag (nnx.Param, "batch_stats") cannot select there.
_PATH_FILTERS = (filterlib.PathContains, filterlib.PathIn, filterlib.Everything,
                 filterlib.Nothing)
_FORMS = ("a regex string such as r'^stem_conv/kernel$', an NNX path filter such as "
          "nnx.PathContains('stem_conv'), a callable (path: str, leaf) -> bool, or a pytree "
          "of bools with the params' structure")


def _check_path_filter(f: Any) -> None:
    """TypeError unless the NNX filter ``f`` looks at paths only."""
    if isinstance(f, _PATH_FILTERS):
        return
    if isinstance(f, filterlib.Any | filterlib.All):
        for p in f.predicates:
            _check_path_filter(p)
        return
    if isinstance(f, filterlib.Not):
        _check_path_filter(f.predicate)
        return
    raise TypeError(
        f"pre_svd: the NNX filter {f!r} tests the Variable's type or tag, which nnx.Optimizer "
        "strips before tx.update; select by path: a regex such as r'^stem_conv/kernel$', "
        "nnx.PathContains or PathIn (alone or in nnx.Any/All/Not)"
    )


Predicate = Callable[[tuple[Any, ...], str, Any], bool]


def _selector(pre_svd: PreSvdSelection) -> Predicate | None:
    """Checks the form of a selection; its predicate ``(keys, path, array) -> bool``, or
    ``None`` for a bool pytree (checked against the params by :func:`pre_svd_mask`)."""
    if isinstance(pre_svd, str):
        if not pre_svd:
            raise ValueError("pre_svd: the empty regex '' selects every parameter; write the "
                             "Pre-SVD path, e.g. r'^stem_conv/kernel$'")
        try:
            regex = re.compile(pre_svd)
        except re.error as e:
            raise ValueError(f"pre_svd={pre_svd!r} is not a valid regex: {e}") from None
        return lambda keys, path, x: regex.search(path) is not None
    if isinstance(pre_svd, type):
        if issubclass(pre_svd, nnx.Variable):
            _check_path_filter(pre_svd)
        raise TypeError(f"pre_svd must be {_FORMS}; got the class {pre_svd!r}")
    if type(pre_svd).__module__ == filterlib.__name__:
        _check_path_filter(pre_svd)
        return lambda keys, path, x: bool(pre_svd(keys, x))
    if callable(pre_svd):

        def call(keys: tuple[Any, ...], path: str, x: Any) -> bool:
            out = pre_svd(path, x)
            if not isinstance(out, bool | np.bool_):
                raise TypeError(
                    f"pre_svd: the selection callable returned {out!r} "
                    f"({type(out).__name__}) for {path!r}; it must return a bool"
                )
            return bool(out)

        return call
    leaves = leaves_with_paths(pre_svd)
    if not leaves or leaves[0][0] == ():
        raise TypeError(f"pre_svd must be {_FORMS}; got {pre_svd!r} ({type(pre_svd).__name__})")
    for path, leaf in leaves:
        if not isinstance(unwrap(leaf), bool | np.bool_):
            raise TypeError(
                f"pre_svd: the bool pytree has {unwrap(leaf)!r} ({type(unwrap(leaf)).__name__}) "
                f"at {path_str(path)!r}; every leaf must be a bool"
            )
    return None


def pre_svd_mask(params: optax.Params, pre_svd: PreSvdSelection) -> Any:
    """Boolean pytree selecting the Pre-SVD parameter(s).

    Paths are the keys joined by '/', e.g. ``"stem_conv/kernel"``, for a Flax Linen params
    dict and for a Flax NNX state alike: an ``nnx.Variable`` counts as one leaf (its
    ``.value`` key is not part of the path), so the same regex selects in
    ``nnx.Optimizer.init`` (which sees Variables) and in ``update`` (which sees bare arrays).

    Args:
      params: parameter pytree (or an updates pytree of the same structure).
      pre_svd: one of

        * a regex string matched with ``re.search`` against each '/'-joined path
          (e.g. ``r"^stem_conv/kernel$"``);
        * an NNX path filter: ``nnx.PathContains(...)``, ``PathIn(...)``, or ``nnx.Any`` /
          ``nnx.All`` / ``nnx.Not`` of those (type or tag filters such as ``nnx.Param``
          raise ``TypeError``: ``nnx.Optimizer.update`` passes bare arrays);
        * a callable ``(path: str, leaf) -> bool`` (``leaf`` is the array; during optimizer
          updates it is the update, which has the parameter's shape);
        * a pytree of bools with ``params``' structure.

    Returns:
      Pytree of Python bools with ``params``' structure (one bool per NNX Variable).

    Raises:
      ValueError: if the selection matches no parameter (the message lists the available
        paths), the regex is empty or invalid, or a bool pytree's structure differs.
      TypeError: for a selection of another type (e.g. an int), a non-bool leaf in a bool
        pytree, a callable that returns a non-bool, or an NNX type/tag filter.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"stem": {"kernel": jnp.zeros((3, 3, 3, 8))}, "fc": {"bias": jnp.zeros(2)}}
      >>> pre_svd_mask(params, r"^stem/kernel$")
      {'fc': {'bias': False}, 'stem': {'kernel': True}}
    """
    select = _selector(pre_svd)
    leaves = leaves_with_paths(params)
    treedef = jax.tree_util.tree_structure(params, is_leaf=is_variable)
    paths = [path_str(p) for p, _ in leaves]
    if select is None:
        flags_tree, sel_def = jax.tree_util.tree_flatten(pre_svd, is_leaf=is_variable)
        if sel_def != treedef:
            raise ValueError(
                "pre_svd_mask: the bool pytree does not have the params' structure:\n"
                f"  pre_svd: {sel_def}\n  params:  {treedef}"
            )
        flags = [bool(unwrap(f)) for f in flags_tree]
    else:
        flags = [
            select(tuple(key_of(k) for k in p), s, unwrap(x))
            for (p, x), s in zip(leaves, paths, strict=True)
        ]
    if not any(flags):
        raise ValueError(
            f"pre_svd_mask: selection pre_svd={pre_svd!r} matches no parameter; available "
            f"paths: {paths}"
        )
    return treedef.unflatten(flags)


def pre_svd_labels(pre_svd: PreSvdSelection) -> Callable[[optax.Params], Any]:
    """``optax.partition`` labels: ``"pre_svd"`` for the selected parameter(s), else
    ``"other"``.

    The ``"pre_svd"`` partition is the layer before the meta-layer, whose raw gradient NOG
    replaces by its nearest orthogonal matrix (Eqs. 14-17) and whose step OLR scales by
    eta* (Eqs. 18-21); docs/nog_olr.md spells the chain out.

    Args:
      pre_svd: Pre-SVD selection, see :func:`pre_svd_mask` (its form is checked now, the
        match when the labels are computed).

    Returns:
      A function ``params -> pytree of "pre_svd" / "other"``, for
      ``optax.partition({"pre_svd": ..., "other": ...}, pre_svd_labels(pre_svd))``.

    Raises:
      ValueError, TypeError: as :func:`pre_svd_mask`.

    Example:
      >>> import jax.numpy as jnp
      >>> labels = pre_svd_labels(r"^stem/kernel$")
      >>> labels({"stem": {"kernel": jnp.zeros((3, 3, 3, 8))}, "fc": {"bias": jnp.zeros(2)}})
      {'fc': {'bias': 'other'}, 'stem': {'kernel': 'pre_svd'}}
    """
    _selector(pre_svd)

    def labels(params: optax.Params) -> Any:
        mask = pre_svd_mask(params, pre_svd)
        return jax.tree_util.tree_map(lambda m: "pre_svd" if m else "other", mask)

    return labels


def pre_svd_sgd(
    learning_rate: optax.ScalarOrSchedule,
    pre_svd: PreSvdSelection,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nog: bool = False,
    olr: bool = False,
    nog_method: str = "svd",
    nog_rtol: float | None = None,
) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, plus NOG/OLR on the Pre-SVD parameter.

    Every parameter follows torch.optim.SGD: ``d = g + wd w``, ``buf = m buf + d`` (``buf = d``
    on the first step), ``w <- w - lr_t buf``. For the Pre-SVD parameter(s):

    * ``nog=True``: ``g`` is first replaced by its polar factor (Eqs. 14-17), on the raw
      gradient, before weight decay and momentum;
    * ``olr=True``: ``lr_t`` is replaced by ``eta`` (Eqs. 20-21) computed from the weight and
      the (NOG'd) gradient, ``eta = eta*`` if ``0 < eta* < lr_t`` else ``lr_t``.

    It is ``optax.partition`` over :func:`pre_svd_labels` of two branches: Pre-SVD,
    ``chain(nearest_orthogonal_gradient(), optimal_learning_rate(lr, momentum=m,
    weight_decay=wd))`` (either piece only when asked), and the rest,
    ``chain(add_decayed_weights(wd), trace(m), scale_by_learning_rate(lr))``. Labels are
    computed from the params tree, so an empty selection raises at ``init``. Works with Flax
    NNX's ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (see the module docstring).

    Values: a NaN/Inf gradient or weight, or an out-of-range value injected under ``jit``
    (``optax.inject_hyperparams``: a negative rate, momentum outside ``[0, 1)``, a negative
    weight decay) gives NaN updates, so ``optax.apply_if_finite`` skips the step.

    Args:
      learning_rate: float > 0 or optax schedule (the rate of all layers; OLR's ``lr_t``).
      pre_svd: Pre-SVD selection, see :func:`pre_svd_mask`.
      momentum: momentum coefficient in ``[0, 1)`` (dampening 0, no Nesterov).
      weight_decay: coupled L2 coefficient ``>= 0`` added to every gradient (biases
        included, like torch's default).
      nog: apply the Nearest Orthogonal Gradient to the Pre-SVD gradient.
      olr: use the Optimal Learning Rate for the Pre-SVD parameter.
      nog_method: polar factor method for NOG (``"svd"`` or ``"newton_schulz"``).
      nog_rtol: NOG's ``rtol`` (see :func:`~svdcond_jax.transforms.nearest_orthogonal_gradient`).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``. The OLR eta can be
      read back with :func:`find_olr_eta`.

    Raises:
      ValueError, TypeError: at construction for out-of-range or mistyped arguments (naming
        the argument and its value), at ``init`` for a selection that matches nothing (see
        :func:`pre_svd_mask`) or, with ``nog=True``, a selected leaf with ``ndim < 2``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"stem": {"kernel": jnp.ones((3, 3, 2, 4))}, "fc": {"bias": jnp.zeros(2)}}
      >>> tx = pre_svd_sgd(0.1, r"^stem/kernel$", nog=True, olr=True)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> round(float(find_olr_eta(state)), 4)  # eta* > lr here, so the switch keeps lr
      0.1
    """
    fn = "pre_svd_sgd"
    _check_flags(fn, nog=nog, olr=olr)
    _check_sgd_hyperparams(fn, learning_rate, momentum, weight_decay)
    other = _torch_sgd(learning_rate, momentum, weight_decay)
    return _pre_svd_partition(fn, learning_rate, pre_svd, other, momentum=momentum,
                              weight_decay=weight_decay, nesterov=False, nog=nog, olr=olr,
                              nog_method=nog_method, nog_rtol=nog_rtol)


def _check_flags(fn: str, **flags: Any) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{fn}: {name} must be a bool, got {name}={flag!r}")


def _torch_sgd(learning_rate: optax.ScalarOrSchedule, momentum: Any, weight_decay: Any,
               nesterov: bool = False) -> optax.GradientTransformation:
    """torch.optim.SGD: ``d = g + wd w``, ``buf = m buf + d``, ``w <- w - lr buf``.

    optax.trace starts from a zero buffer, so buf = d on the first step, like torch.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=nesterov),
        _descent_scale(learning_rate, momentum, weight_decay),
    )


def _with_float_checks(fn: str, tx: optax.GradientTransformation
                       ) -> optax.GradientTransformation:
    """``tx`` whose init/update name the path of a leaf that is not real floating."""

    def init_fn(params: optax.Params) -> optax.OptState:
        _check_float_leaves(fn, "parameter", params)
        return tx.init(params)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        _check_float_leaves(fn, "update", updates)
        return tx.update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def _pre_svd_partition(fn: str, learning_rate: optax.ScalarOrSchedule,
                       pre_svd: PreSvdSelection, rest: optax.GradientTransformation, *,
                       momentum: Any, weight_decay: Any, nesterov: bool, nog: bool, olr: bool,
                       nog_method: str, nog_rtol: float | None
                       ) -> optax.GradientTransformation:
    """``partition({"pre_svd": ..., "other": rest})``: the Pre-SVD branch is
    ``[NOG,] OLR`` (olr), ``NOG, SGD`` (nog only) or ``rest`` (neither)."""
    labels = pre_svd_labels(pre_svd)
    nog_tx = nearest_orthogonal_gradient(method=nog_method, rtol=nog_rtol)
    if olr:
        pre = optimal_learning_rate(learning_rate, momentum=momentum,
                                    weight_decay=weight_decay, nesterov=nesterov)
    elif nog:
        pre = _torch_sgd(learning_rate, momentum, weight_decay, nesterov)
    else:
        pre = rest
    if nog:
        pre = optax.chain(nog_tx, pre)
    return _with_float_checks(fn, optax.partition({"pre_svd": pre, "other": rest}, labels))


def pre_svd_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    pre_svd: PreSvdSelection,
    *,
    rest: optax.GradientTransformation,
    nog: bool = True,
    olr: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    nog_method: str = "svd",
    nog_rtol: float | None = None,
) -> optax.GradientTransformation:
    """NOG and OLR on the Pre-SVD parameter, any optax optimizer (``rest``) for the others.

    The Pre-SVD parameter keeps the paper's treatment: its raw gradient is replaced by its
    polar factor (``nog``, Eqs. 14-17) and it takes torch-style SGD steps (coupled weight
    decay, momentum) at OLR's rate ``eta`` (``olr``, Eqs. 18-21), ``eta = eta*`` if
    ``0 < eta* < learning_rate_t`` else ``learning_rate_t``; with ``nog`` alone, at
    ``learning_rate_t``. With neither, it is trained by ``rest`` like the others.

    ``learning_rate`` is OLR's cap, and it is an SGD rate. The paper caps eta by "the
    learning rate the other layers use" because they use SGD: eta multiplies the
    (orthogonal) gradient directly, so the cap is the largest plain SGD step the Pre-SVD
    layer may take. Next to AdamW the other layers' rate (1e-3, say) is not such a rate:
    AdamW moves every entry by about lr whatever the gradient's size, while an SGD step on
    the polar factor ``R`` (``|R|_F = sqrt(rank)``) moves the layer by ``eta sqrt(rank)``.
    Give the rate SGD would train that layer with (the paper's 0.1, with the same decay
    schedule shape as ``rest``'s; measured eta* values: docs/nog_olr.md) -- passing AdamW's
    1e-3 would make the switch pick the cap at nearly every step and freeze the layer.

    Args:
      learning_rate: the Pre-SVD layer's SGD rate and OLR's cap: a float > 0 or a schedule
        (evaluated at this optimizer's step count).
      pre_svd: Pre-SVD selection, see :func:`pre_svd_mask`.
      rest: the optimizer of every other parameter, e.g. ``optax.adamw(1e-3)``; checked
        with :func:`check_olr_placement`.
      nog: NOG on the Pre-SVD gradient.
      olr: OLR as the Pre-SVD layer's rate.
      momentum: the Pre-SVD layer's SGD momentum in ``[0, 1)`` (torch's buffer).
      weight_decay: the Pre-SVD layer's coupled L2 coefficient ``>= 0`` (it does not enter
        eta).
      nesterov: Nesterov momentum for the Pre-SVD layer (needs ``momentum > 0``).
      nog_method: polar factor method (:func:`~svdcond_jax.orthogonal.polar_factor`).
      nog_rtol: NOG's ``rtol``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``. It composes with
      ``optax.MultiSteps`` (gradient accumulation: NOG and OLR then see the mean gradient
      of the k micro-batches, once per k steps; docs/nog_olr.md), ``inject_hyperparams``
      and ``apply_if_finite``.

    Raises:
      TypeError: ``rest`` not an ``optax.GradientTransformation``, non-bool flags, and the
        argument errors of :func:`pre_svd_sgd`.
      ValueError: ``rest`` feeds an OLR an already-scaled update
        (:func:`check_olr_placement`), out-of-range hyperparameters; at ``init`` a
        selection that matches nothing.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"stem": {"kernel": jnp.ones((3, 3, 2, 4))}, "fc": {"bias": jnp.zeros(2)}}
      >>> tx = pre_svd_optimizer(0.1, r"^stem/kernel$", rest=optax.adamw(1e-3))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> round(float(find_olr_eta(state)), 4)  # eta* > 0.1 here: the cap
      0.1
    """
    fn = "pre_svd_optimizer"
    if not isinstance(rest, optax.GradientTransformation):
        raise TypeError(f"{fn}: rest must be an optax.GradientTransformation such as "
                        f"optax.adamw(1e-3); got {type(rest).__name__}")
    check_olr_placement(rest)
    _check_flags(fn, nog=nog, olr=olr, nesterov=nesterov)
    _check_sgd_hyperparams(fn, learning_rate, momentum, weight_decay)
    if olr and nesterov and float(momentum) == 0.0:
        raise ValueError(f"{fn}: nesterov=True needs momentum > 0, got momentum={momentum!r}")
    return _pre_svd_partition(fn, learning_rate, pre_svd, rest, momentum=momentum,
                              weight_decay=weight_decay, nesterov=bool(nesterov), nog=nog,
                              olr=olr, nog_method=nog_method, nog_rtol=nog_rtol)


# ------------------------------------------------------------------- OLR's placement

_OLR = "optimal_learning_rate"


def _factory(fn: Any) -> str:
    """The factory that made a function: 'scale_by_adam', 'chain', ... ('' if none)."""
    name = getattr(fn, "__qualname__", "")
    return name.split(".<locals>")[0] if ".<locals>" in name else ""


def _is_scaler(name: str) -> bool:
    """optax names every transform that applies a rate or a preconditioner scale*:
    scale, scale_by_learning_rate/schedule, scale_by_adam, scale_by_muon, ..."""
    return name.startswith("scale")


Node = tuple[Any, Any]  # (init, update) of a transformation


def _node(tx: Any) -> Node:
    """``(init, update)``, looking through optax's with_extra_args_support wrapper."""
    init, update = tx.init, tx.update
    if _factory(update) == "with_extra_args_support":
        inner = _closure(update).get("tx")
        if isinstance(inner, optax.GradientTransformation):
            return _node(inner)
    return init, update


def _parts(value: Any) -> list[Node]:
    """The transformations inside a closure value, as nodes."""
    if isinstance(value, optax.MultiSteps):
        return [_node(value.gradient_transformation())]
    if isinstance(value, optax.GradientTransformation):
        return [_node(value)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _parts(v)]
    if isinstance(value, tuple | list):
        return [p for v in value for p in _parts(v)]
    return []


def _closure(fn: Any) -> dict[str, Any]:
    """The nonlocal variables of a function (empty for anything else)."""
    if not inspect.isfunction(fn):
        return {}
    return inspect.getclosurevars(fn).nonlocals


def _rebuild_injected(closure: dict[str, Any]) -> optax.GradientTransformation | None:
    """The transformation ``inject_hyperparams(factory)(...)`` builds at each step, rebuilt
    from its closure with the schedules at step 0 (None if that fails: opaque)."""
    factory = closure.get("inner_factory")
    try:
        kwargs = {**closure.get("other_hps", {}), **closure.get("numeric_hps", {})}
        kwargs.update({k: f(f.init()) for k, f in closure.get("sched_hps", {}).items()})
        return factory(**kwargs)
    except Exception:  # noqa: BLE001 -- any failure only means we cannot look inside
        return None


def _walk(node: Node, scaled_by: str | None, trail: str, seen: frozenset[int]) -> str | None:
    """Raises if an OLR inside ``node`` receives an update scaled by ``scaled_by`` (the
    name of an earlier member of an enclosing chain). Returns the name of a scaling
    transform inside ``node`` (None if there is none), for the chain's later members."""
    init, update = node
    owner = getattr(update, "__self__", None)
    if isinstance(owner, optax.MultiSteps):  # MultiSteps(...).gradient_transformation()
        return _walk(_node(owner.inner_opt), scaled_by, f"{trail}MultiSteps/", seen)
    if id(update) in seen:  # a cycle through closures (the same transform twice is fine)
        return None
    seen = seen | {id(update)}
    name = _factory(update) or _factory(init)
    closure = {**_closure(init), **_closure(update)}
    if name == _OLR:
        if scaled_by is not None:
            raise ValueError(
                f"check_olr_placement: optimal_learning_rate ({trail}{_OLR}) is fed an update "
                f"already scaled by {scaled_by}. OLR is itself the optimizer of its parameters "
                "(SGD at rate eta, Eq. 20, computed from the gradient it receives): put it "
                "where optax.sgd would go, last in its chain, after NOG or on the raw "
                "gradient -- never after optax.sgd/adam/adamw, scale_by_adam, "
                "scale_by_learning_rate or another OLR (docs/nog_olr.md)")
        return _OLR
    if _is_scaler(name):
        return name
    if name == "inject_hyperparams":
        inner = _rebuild_injected(closure)
        if inner is None:
            return None
        return _walk(_node(inner), scaled_by, f"{trail}inject_hyperparams/", seen)
    if name in ("chain", "named_chain"):  # ordered: a scaler affects the later members
        if "update_fns" in closure:
            members = list(zip(closure.get("init_fns", closure["update_fns"]),
                               closure["update_fns"], strict=True))
        else:
            members = _parts(closure.get("transforms", ()))
        found = None
        for i, member in enumerate(members):
            got = _walk(_unwrap_node(member), scaled_by or found, f"{trail}{name}[{i}]/", seen)
            found = found or got
        return found
    found = None  # partition, masked, apply_if_finite, ...: members in parallel
    for value in closure.values():
        for part in _parts(value):
            found = _walk(part, scaled_by, f"{trail}{name}/", seen) or found
    return found


def _unwrap_node(node: Node) -> Node:
    """A chain member with its with_extra_args_support wrapper removed."""
    init, update = node
    if _factory(update) == "with_extra_args_support":
        inner = _closure(update).get("tx")
        if isinstance(inner, optax.GradientTransformation):
            return _node(inner)
    return node


def check_olr_placement(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Raises if ``tx`` feeds :func:`~svdcond_jax.transforms.optimal_learning_rate` an
    update that an earlier transform already scaled; returns ``tx`` unchanged otherwise.

    OLR is a whole SGD optimizer: its eta (Eq. 20) is computed from the gradient it
    receives and it negates and scales the step itself. Chained after ``optax.sgd`` or
    ``optax.scale_by_learning_rate`` it takes the negated step for the gradient and ascends;
    after ``optax.scale_by_adam`` (or ``adam``/``adamw``) it computes eta from Adam's
    elementwise-normalised direction. Neither can be noticed from the losses.

    ``optax.chain`` does not tell its members what precedes them, so OLR cannot check this
    when you build a chain by hand: pass the finished optimizer through this function (the
    recipes here and the training library do it for you). It looks inside ``optax.chain``,
    ``named_chain``, ``partition``, ``masked``, ``apply_if_finite``, ``MultiSteps`` and
    ``inject_hyperparams`` (rebuilt with its schedules at step 0), through the closures
    optax builds them with, and treats every transform named ``scale*`` (optax's naming:
    ``scale``, ``scale_by_learning_rate``, ``scale_by_adam``, ...; the aliases ``sgd``,
    ``adam``, ``adamw`` are chains of them) as scaling. What it cannot see: transforms that
    scale without such a name (your own, or optax's under another name), transformations
    kept in objects other than those above, and compositions written by hand as new
    init/update functions; those pass unchecked.

    Args:
      tx: the optimizer to check.

    Returns:
      ``tx``, so that ``tx = check_olr_placement(optax.chain(...))`` reads as construction.

    Raises:
      ValueError: naming the scaling transform and OLR's place in ``tx``.

    Example:
      >>> import optax
      >>> from svdcond_jax.transforms import optimal_learning_rate
      >>> tx = optax.chain(optax.scale_by_adam(), optimal_learning_rate(0.1))
      >>> check_olr_placement(tx)  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
      Traceback (most recent call last):
      ...
      ValueError: check_olr_placement: optimal_learning_rate (chain[1]/...) is fed an update
      already scaled by scale_by_adam. ...
    """
    if not isinstance(tx, optax.GradientTransformation | optax.MultiSteps):
        raise TypeError(f"check_olr_placement: tx must be an optax.GradientTransformation; got "
                        f"{type(tx).__name__}")
    node = _node(tx.gradient_transformation() if isinstance(tx, optax.MultiSteps) else tx)
    _walk(node, None, "", frozenset())
    return tx


# --------------------------------------------------------------- every matrix layer

DEFAULT_SELECT = r"kernel$"
"""Default selection of :func:`nog_optimizer`: every leaf whose path ends in ``kernel``
and has ``ndim >= 2`` (Flax Linen ``Conv``/``Dense`` and NNX ``Conv``/``Linear``)."""

DEFAULT_EXCLUDE = r"(^|/)(fc|head|classifier|logits|output|lm_head)/kernel$"
"""Default exclusion of :func:`nog_optimizer`: the classifier head's kernel, a module
named fc, head, classifier, logits, output or lm_head (``fc/kernel`` in
:mod:`svdcond_jax.models`; ``head/pre_svd_conv/kernel`` is not excluded)."""

CONVENTIONS = ("paper", "muon")
ORTHOGONALIZE = ("gradient", "momentum")


def _flags(params: Any, selection: PreSvdSelection, what: str) -> tuple[list[bool], list[str]]:
    """One bool per leaf (NNX Variables as leaves) and the paths."""
    select = _selector(selection)
    leaves = leaves_with_paths(params)
    paths = [path_str(p) for p, _ in leaves]
    if select is None:
        flags_tree, sel_def = jax.tree_util.tree_flatten(selection, is_leaf=is_variable)
        treedef = jax.tree_util.tree_structure(params, is_leaf=is_variable)
        if sel_def != treedef:
            raise ValueError(f"nog_labels: the bool pytree {what} does not have the params' "
                             f"structure:\n  {what}: {sel_def}\n  params:  {treedef}")
        return [bool(unwrap(f)) for f in flags_tree], paths
    return [select(tuple(key_of(k) for k in p), path, unwrap(x))
            for (p, x), path in zip(leaves, paths, strict=True)], paths


def nog_mask(params: Any, select: PreSvdSelection = DEFAULT_SELECT,
             exclude: PreSvdSelection | None = DEFAULT_EXCLUDE) -> Any:
    """Boolean pytree: the matrix parameters :func:`nog_optimizer` orthogonalises.

    A leaf is selected when ``select`` matches it, it has ``ndim >= 2`` and ``exclude``
    does not match it. Both selections take the forms of :func:`pre_svd_mask` (regex on
    '/'-joined paths, NNX path filter, callable, bool pytree).

    Raises:
      ValueError: ``select`` selects no matrix, or ``exclude`` matches no parameter (a
        typo, or a head named otherwise: pass ``exclude=`` its path or ``None``); the
        message lists the paths.
    """
    picked, paths = _flags(params, select, "select")
    ndims = [np.ndim(unwrap(x)) for _, x in leaves_with_paths(params)]
    picked = [p and n >= 2 for p, n in zip(picked, ndims, strict=True)]
    if exclude is not None:
        dropped, _ = _flags(params, exclude, "exclude")
        if not any(dropped):
            raise ValueError(
                f"nog_mask: exclude={exclude!r} matches no parameter (the default is meant "
                "for the classifier head); pass the head's path as exclude=..., or "
                f"exclude=None to orthogonalise every selected kernel; paths: {paths}")
        picked = [p and not d for p, d in zip(picked, dropped, strict=True)]
    if not any(picked):
        raise ValueError(f"nog_mask: select={select!r} (minus exclude={exclude!r}) selects no "
                         f"parameter with ndim >= 2; paths: {paths}")
    treedef = jax.tree_util.tree_structure(params, is_leaf=is_variable)
    return treedef.unflatten(picked)


def nog_labels(select: PreSvdSelection = DEFAULT_SELECT,
               exclude: PreSvdSelection | None = DEFAULT_EXCLUDE
               ) -> Callable[[optax.Params], Any]:
    """``optax.partition`` labels: ``"nog"`` for :func:`nog_mask`'s matrices, else
    ``"rest"``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4)},
      ...           "fc": {"kernel": jnp.zeros((4, 10))}}
      >>> nog_labels()(params)
      {'conv': {'bias': 'rest', 'kernel': 'nog'}, 'fc': {'kernel': 'rest'}}
    """
    _selector(select)
    if exclude is not None:
        _selector(exclude)

    def labels(params: optax.Params) -> Any:
        mask = nog_mask(params, select, exclude)
        return jax.tree_util.tree_map(lambda m: "nog" if m else "rest", mask)

    return labels


def _pick(value: Any, paper: Any, muon: Any, conventions: str) -> Any:
    return value if value is not None else (paper if conventions == "paper" else muon)


def nog_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    conventions: str = "paper",
    orthogonalize: str | None = None,
    momentum: float | None = None,
    nesterov: bool | None = None,
    weight_decay: float | None = None,
    shape_scale: bool | None = None,
    olr: bool = False,
    polar_method: str = "polar_express",
    polar_rtol: float | None = None,
    matmul_dtype: Any = None,
    select: PreSvdSelection = DEFAULT_SELECT,
    exclude: PreSvdSelection | None = DEFAULT_EXCLUDE,
    rest: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """NOG (and OLR per layer) on every conv and dense kernel; ``rest`` for the others.

    The matrices are :func:`nog_mask`'s: every ``.../kernel`` with ``ndim >= 2`` except the
    classifier head (conv kernels seen as ``(kh*kw*in, out)``, as the paper reshapes the
    Pre-SVD kernel); biases, norm scales and the head go to ``rest``. Two sets of
    conventions, each argument left ``None`` taking the set's value:

    ===================  ===================================  =================================
    argument             ``conventions="paper"`` (NOG)        ``conventions="muon"``
    ===================  ===================================  =================================
    ``orthogonalize``    ``"gradient"``: polar factor of the  ``"momentum"``: of the momentum
                         raw gradient, then momentum          (:func:`~svdcond_jax.transforms.
                                                              ema_momentum`, bias-corrected)
    ``momentum``         0.9 (torch's buffer ``m buf + d``)   0.95 (EMA decay beta)
    ``nesterov``         False                                True
    ``weight_decay``     5e-4, coupled: added to the          0.0, decoupled: ``lr wd w``
                         orthogonalised gradient, through     added after orthogonalising
                         momentum
    ``shape_scale``      False                                True: ``sqrt(max(1, out/in))``
    ``rest``             the same SGD                         ``optax.adamw(learning_rate,
                                                              nesterov=True)`` (optax muon's)
    ===================  ===================================  =================================

    ``polar_method`` is independent of both: ``"polar_express"`` (default: within 7.6e-3 of
    the polar factor at Muon's cost), ``"svd"``/``"newton_schulz"`` (exact/converged),
    ``"muon"`` (optax.contrib.muon's Frobenius-normalised iteration: with
    ``conventions="muon"`` this is ``optax.contrib.muon``, to float32 round-off). So a
    Muon user switches to NOG by replacing ``optax.contrib.muon(lr)`` with
    ``nog_optimizer(lr, conventions="muon")``.

    ``olr=True`` gives every selected kernel its own OLR eta (Eqs. 20-21 on that kernel and
    its orthogonalised gradient or momentum), capped by ``learning_rate``, instead of the
    shape scaling (both set per-layer step sizes: ``shape_scale`` with ``olr`` raises).

    Args:
      learning_rate: rate of the selected kernels (OLR's cap with ``olr``): float > 0 or a
        schedule.
      conventions: ``"paper"`` or ``"muon"``, the defaults of the arguments below.
      orthogonalize: ``"gradient"`` or ``"momentum"``: what the polar factor is taken of.
      momentum: in ``[0, 1)``.
      nesterov: Nesterov momentum.
      weight_decay: ``>= 0``, for the selected kernels (``rest`` has its own).
      shape_scale: multiply each orthogonalised update by ``sqrt(max(1, fan_out/fan_in))``.
      olr: per-layer OLR.
      polar_method, polar_rtol, matmul_dtype: the polar factor's ``method``, ``rtol`` and
        ``matmul_dtype`` (:func:`~svdcond_jax.orthogonal.polar_factor`).
      select, exclude: which leaves are orthogonalised, see :func:`nog_mask`.
      rest: the optimizer of every other parameter; checked by :func:`check_olr_placement`.

    Returns:
      An ``optax.GradientTransformation`` (``update`` needs ``params`` for weight decay and
      OLR); with ``olr``, :func:`find_olr_eta` returns the per-kernel etas.

    Raises:
      ValueError, TypeError: unknown ``conventions``/``orthogonalize``/``polar_method``,
        out-of-range or mistyped hyperparameters, ``shape_scale`` with ``olr``, a ``rest``
        that is not a transformation or feeds OLR a scaled update; at ``init``, selections
        that match nothing (:func:`nog_mask`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)},
      ...           "fc": {"kernel": jnp.ones((4, 10))}}
      >>> grads = jax.tree_util.tree_map(
      ...     lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
      >>> tx = nog_optimizer(0.1, olr=True)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> u = updates["conv"]["kernel"].reshape(18, 4)  # -eta (R + wd w): R orthogonal
      >>> eta = float(find_olr_eta(state))
      >>> bool(jnp.allclose(u.T @ u / eta**2, jnp.eye(4), atol=0.05))
      True
    """
    fn = "nog_optimizer"
    if conventions not in CONVENTIONS:
        raise ValueError(f"{fn}: conventions must be one of {CONVENTIONS}; got "
                         f"conventions={conventions!r}")
    orthogonalize = _pick(orthogonalize, "gradient", "momentum", conventions)
    if orthogonalize not in ORTHOGONALIZE:
        raise ValueError(f"{fn}: orthogonalize must be one of {ORTHOGONALIZE}; got "
                         f"orthogonalize={orthogonalize!r}")
    momentum = _pick(momentum, 0.9, 0.95, conventions)
    nesterov = _pick(nesterov, False, True, conventions)
    weight_decay = _pick(weight_decay, 5e-4, 0.0, conventions)
    if shape_scale is None:  # Muon's width scaling, unless OLR sets the layers' rates
        shape_scale = conventions == "muon" and not olr
    _check_flags(fn, nesterov=nesterov, shape_scale=shape_scale, olr=olr)
    _check_sgd_hyperparams(fn, learning_rate, momentum, weight_decay)
    if olr and shape_scale:
        raise ValueError(f"{fn}: shape_scale=True with olr=True: OLR sets each layer's rate "
                         "(Eq. 20) and Muon's shape scaling is another rule for the same "
                         "thing; pick one")
    if rest is None:
        rest = (_torch_sgd(learning_rate, momentum, weight_decay, nesterov)
                if conventions == "paper" else
                optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                            nesterov=True))
    elif not isinstance(rest, optax.GradientTransformation):
        raise TypeError(f"{fn}: rest must be an optax.GradientTransformation such as "
                        f"optax.adamw(1e-3); got {type(rest).__name__}")
    check_olr_placement(rest)
    nog = nearest_orthogonal_gradient(method=polar_method, rtol=polar_rtol,
                                      matmul_dtype=matmul_dtype)
    scale = [scale_by_shape()] if shape_scale else []
    if orthogonalize == "gradient":
        if olr:
            step = optimal_learning_rate(learning_rate, momentum=momentum,
                                         weight_decay=weight_decay, nesterov=nesterov)
        else:
            step = _torch_sgd(learning_rate, momentum, weight_decay, nesterov)
        matrices = optax.chain(nog, *scale, step)
    else:
        if olr:
            step = optimal_learning_rate(learning_rate, weight_decay=weight_decay)
        else:
            step = optax.chain(optax.add_decayed_weights(weight_decay),
                               optax.scale_by_learning_rate(learning_rate))
        matrices = optax.chain(ema_momentum(momentum, nesterov=nesterov), nog, *scale, step)
    labels = nog_labels(select, exclude)
    return _with_float_checks(fn, optax.partition({"nog": matrices, "rest": rest}, labels))


def find_olr_eta(opt_state: optax.OptState) -> jax.Array | None:
    """Returns the eta OLR used at the last step, from any optimizer state containing it.

    Searches ``opt_state`` (also inside ``optax.partition``, ``optax.chain``,
    ``optax.masked``, ``optax.apply_if_finite`` or ``optax.inject_hyperparams`` states, and
    an ``nnx.Optimizer``'s ``opt_state``) for
    :class:`~svdcond_jax.transforms.OptimalLearningRateState`.

    Args:
      opt_state: an optimizer state.

    Returns:
      ``None`` if no OLR state is present; the scalar eta when OLR acts on exactly one
      parameter (the usual single Pre-SVD layer); otherwise a 1-D array of the etas in
      tree-leaf order. Before the first step the eta is 0; after a step with non-finite
      inputs it is NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = pre_svd_sgd(0.1, "kernel", olr=True)
      >>> find_olr_eta(tx.init({"kernel": jnp.eye(2)})).shape
      ()
    """
    states = [
        s
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, OptimalLearningRateState)
        )
        if isinstance(s, OptimalLearningRateState)
    ]
    etas = [e for s in states for e in jax.tree_util.tree_leaves(s.eta)]
    if not etas:
        return None
    if len(etas) == 1:
        return jnp.asarray(etas[0])
    return jnp.stack([jnp.asarray(e) for e in etas])
