"""SGD with NOG and OLR on the Pre-SVD layer, composed from optax pieces.

:func:`pre_svd_sgd` reproduces torch.optim.SGD (coupled L2 weight decay, momentum with
dampening 0, then the learning rate) on every parameter, with the Nearest Orthogonal Gradient
applied to the raw gradient of the Pre-SVD parameter and the Optimal Learning Rate replacing
its learning rate (docs/nog_olr.md). The Pre-SVD selection (:func:`pre_svd_mask`) is
explicit, is written the same way for Flax Linen and Flax NNX (``r"^stem_conv/kernel$"``),
and fails loudly when it matches nothing (the authors' release silently matched no
parameter after ``DataParallel`` renamed them, docs/reference_code.md).

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
    nearest_orthogonal_gradient,
    optimal_learning_rate,
)

__all__ = ["PreSvdSelection", "find_olr_eta", "pre_svd_labels", "pre_svd_mask", "pre_svd_sgd"]

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
    for name, flag in (("nog", nog), ("olr", olr)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{fn}: {name} must be a bool, got {name}={flag!r}")
    _check_sgd_hyperparams(fn, learning_rate, momentum, weight_decay)
    labels = pre_svd_labels(pre_svd)
    nog_tx = nearest_orthogonal_gradient(method=nog_method, rtol=nog_rtol)
    # optax.trace starts from a zero buffer, so buf = d on the first step, like torch.
    other = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum),
        _descent_scale(learning_rate, momentum, weight_decay),
    )
    pre = (
        optimal_learning_rate(learning_rate, momentum=momentum, weight_decay=weight_decay)
        if olr
        else other
    )
    if nog:
        pre = optax.chain(nog_tx, pre)
    tx = optax.partition({"pre_svd": pre, "other": other}, labels)

    def init_fn(params: optax.Params) -> optax.OptState:
        _check_float_leaves(fn, "parameter", params)
        return tx.init(params)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        _check_float_leaves(fn, "update", updates)
        return tx.update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


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
