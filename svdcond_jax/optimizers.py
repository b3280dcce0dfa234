"""SGD with NOG and OLR on the Pre-SVD layer, composed from optax pieces.

:func:`pre_svd_sgd` reproduces torch.optim.SGD (coupled L2 weight decay, momentum with
dampening 0, then the learning rate) on every parameter, with the Nearest Orthogonal
Gradient applied to the raw gradient of the Pre-SVD parameter and the Optimal Learning Rate
replacing its learning rate (docs/nog_olr.md and docs/reference_code.md). The Pre-SVD selection is
explicit and fails loudly when it matches nothing (the reference's OLR silently matched no
parameter after DataParallel renamed them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from svdcond_jax._paths import path_str
from svdcond_jax.transforms import (
    OptimalLearningRateState,
    nearest_orthogonal_gradient,
    optimal_learning_rate,
)

__all__ = ["PreSvdSelection", "find_olr_eta", "pre_svd_mask", "pre_svd_sgd"]

PreSvdSelection = str | Callable[[str, Any], bool] | Any
"""A regex (``re.search`` on '/'-joined paths), a callable ``(path, leaf) -> bool`` or a
pytree of bools with the params' structure."""


def _paths(params: optax.Params) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def pre_svd_mask(params: optax.Params, pre_svd: PreSvdSelection) -> Any:
    """Boolean pytree selecting the Pre-SVD parameter(s).

    Args:
      params: parameter pytree (or an updates pytree of the same structure).
      pre_svd: a regex string matched with ``re.search`` against each leaf's '/'-joined path
        (e.g. ``r"^stem_conv/kernel$"``); or a callable ``(path_str, leaf) -> bool`` (during
        optimizer updates ``leaf`` is the update, which has the parameter's shape); or a
        pytree of bools with ``params``' structure.

    Returns:
      Pytree of Python bools with ``params``' structure.

    Raises:
      ValueError: if the selection matches no parameter (the message lists the available
        paths) or a bool pytree does not match ``params``' structure.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"stem": {"kernel": jnp.zeros((3, 3, 3, 8))}, "fc": {"bias": jnp.zeros(2)}}
      >>> pre_svd_mask(params, r"stem/kernel$")
      {'fc': {'bias': False}, 'stem': {'kernel': True}}
    """
    if isinstance(pre_svd, str):
        regex = re.compile(pre_svd)
        mask = jax.tree_util.tree_map_with_path(
            lambda p, _: regex.search(path_str(p)) is not None, params
        )
    elif callable(pre_svd):
        mask = jax.tree_util.tree_map_with_path(
            lambda p, x: bool(pre_svd(path_str(p), x)), params
        )
    else:
        try:
            mask = jax.tree_util.tree_map(lambda m, _: bool(m), pre_svd, params)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"pre_svd_mask: bool pytree does not match the params structure: {e}"
            ) from e
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(
            f"pre_svd_mask: selection {pre_svd!r} matches no parameter; available paths: "
            f"{_paths(params)}"
        )
    return mask


def _sgd_tail(momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.SGD before the learning rate: d = g + wd w; buf = m buf + d."""
    # optax.trace starts from a zero buffer, so buf = d on the first step, like torch.
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def pre_svd_sgd(
    learning_rate: optax.ScalarOrSchedule,
    pre_svd: PreSvdSelection,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nog: bool = False,
    olr: bool = False,
    nog_method: str = "svd",
) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, plus NOG/OLR on the Pre-SVD parameter.

    Every parameter follows torch.optim.SGD: ``d = g + wd w``, ``buf = m buf + d`` (``buf = d``
    on the first step), ``w <- w - lr_t buf``. For the Pre-SVD parameter(s):

    * ``nog=True``: ``g`` is first replaced by its polar factor (Eqs. 14-17), on the raw
      gradient, before weight decay and momentum;
    * ``olr=True``: ``lr_t`` is replaced by ``eta`` (Eqs. 20-21) computed from the weight and
      the (NOG'd) gradient, ``eta = eta*`` if ``0 < eta* < lr_t`` else ``lr_t``.

    Built as ``optax.partition`` of two branches (Pre-SVD / other) over
    :func:`~svdcond_jax.transforms.nearest_orthogonal_gradient`,
    :func:`~svdcond_jax.transforms.optimal_learning_rate`, ``optax.add_decayed_weights``,
    ``optax.trace`` and ``optax.scale_by_learning_rate``. Labels are computed lazily from the
    params tree, so an empty selection raises at ``init``.

    Args:
      learning_rate: float or optax schedule (the rate of all layers; OLR's ``lr_t``).
      pre_svd: Pre-SVD selection, see :func:`pre_svd_mask`.
      momentum: momentum coefficient (dampening 0, no Nesterov).
      weight_decay: coupled L2 coefficient added to every gradient (biases included, like
        torch's default).
      nog: apply the Nearest Orthogonal Gradient to the Pre-SVD gradient.
      olr: use the Optimal Learning Rate for the Pre-SVD parameter.
      nog_method: polar factor method for NOG (``"svd"`` or ``"newton_schulz"``).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``. The OLR eta can be
      read back with :func:`find_olr_eta`.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"stem": {"kernel": jnp.ones((3, 3, 2, 4))}, "fc": {"bias": jnp.zeros(2)}}
      >>> tx = pre_svd_sgd(0.1, r"^stem/kernel$", nog=True, olr=True)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> round(float(find_olr_eta(state)), 4)  # eta* > lr here, so the switch keeps lr
      0.1
    """

    def labels(tree: optax.Params) -> Any:
        mask = pre_svd_mask(tree, pre_svd)
        return jax.tree_util.tree_map(lambda m: "pre_svd" if m else "other", mask)

    tail = _sgd_tail(momentum, weight_decay)
    other = optax.chain(tail, optax.scale_by_learning_rate(learning_rate))
    pre = optimal_learning_rate(learning_rate, inner=tail) if olr else other
    if nog:
        pre = optax.chain(nearest_orthogonal_gradient(method=nog_method), pre)
    return optax.partition({"pre_svd": pre, "other": other}, labels)


def find_olr_eta(opt_state: optax.OptState) -> jax.Array | None:
    """Returns the eta OLR used at the last step, from any optimizer state containing it.

    Searches ``opt_state`` (also inside ``optax.partition``, ``optax.chain``,
    ``optax.apply_if_finite`` or ``optax.inject_hyperparams`` states) for
    :class:`~svdcond_jax.transforms.OptimalLearningRateState`.

    Args:
      opt_state: an optimizer state.

    Returns:
      ``None`` if no OLR state is present; the scalar eta when OLR acts on exactly one
      parameter (the usual single Pre-SVD layer); otherwise a 1-D array of the etas in
      tree-leaf order. Before the first step the eta is 0.

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
