"""optax transforms for the Pre-SVD layer: NOG (Eqs. 14-17) and OLR (Eqs. 18-21).

* :func:`nearest_orthogonal_gradient` replaces each gradient leaf by its polar factor.
* :func:`optimal_learning_rate` scales an (inner) update by ``-eta`` where ``eta`` is the
  optimal learning rate of Eq. 20 clipped by the switch of Eq. 21.

Both are meant to be applied only to the Pre-SVD parameter; :mod:`svdcond_jax.optimizers`
masks them. See docs/nog_olr.md and docs/reference_code.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from svdcond_jax._paths import path_str
from svdcond_jax.orthogonal import POLAR_METHODS, as_matrix, polar_factor

__all__ = [
    "OptimalLearningRateState",
    "nearest_orthogonal_gradient",
    "optimal_eta",
    "optimal_learning_rate",
]


def nearest_orthogonal_gradient(
    *, method: str = "svd", num_iters: int | None = None
) -> optax.GradientTransformation:
    """Nearest Orthogonal Gradient (NOG, Eqs. 14-17).

    Every leaf ``g`` is reshaped with :func:`~svdcond_jax.orthogonal.as_matrix` to
    ``(prod(shape[:-1]), shape[-1])``, replaced by its polar factor ``U V^T`` (all singular
    values set to 1, no rescaling by the gradient norm) and reshaped back. Apply it to the RAW
    gradient, before weight decay and momentum (docs/nog_olr.md), and only to the
    Pre-SVD parameter (wrap it in ``optax.masked``). A zero gradient gives a zero update.

    Args:
      method: ``"svd"`` (exact) or ``"newton_schulz"``, see
        :func:`~svdcond_jax.orthogonal.polar_factor`.
      num_iters: Newton-Schulz iterations (``None``: polar_factor's default).

    Returns:
      A stateless ``optax.GradientTransformation``. Its ``update`` raises ``ValueError``
      naming the parameter path of any leaf with ``ndim < 2``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = nearest_orthogonal_gradient()
      >>> g = {"kernel": jnp.array([[3.0, 0.0], [0.0, 0.1]])}
      >>> u, _ = tx.update(g, tx.init(g))
      >>> u["kernel"].tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    kwargs: dict[str, Any] = {"method": method}
    if num_iters is not None:
        kwargs["num_iters"] = num_iters
    if method not in POLAR_METHODS:
        raise ValueError(
            f"nearest_orthogonal_gradient: unknown {method=}; valid methods are {POLAR_METHODS}"
        )
    if num_iters is not None and num_iters < 0:
        raise ValueError(f"nearest_orthogonal_gradient: num_iters must be >= 0, got {num_iters=}")

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def leaf_fn(path: tuple[Any, ...], g: jax.Array) -> jax.Array:
        if g.ndim < 2:
            raise ValueError(
                f"nearest_orthogonal_gradient: parameter {path_str(path)!r} has shape "
                f"{g.shape}; NOG needs ndim >= 2 (mask it out with optax.masked)"
            )
        m, back = as_matrix(g)
        return back(polar_factor(m, **kwargs))

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        return jax.tree_util.tree_map_with_path(leaf_fn, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def optimal_eta(w: jax.Array, l: jax.Array) -> jax.Array:  # noqa: E741
    """Optimal learning rate ``eta*`` of Eq. 20 for weight ``w`` and gradient ``l``.

    With ``w`` and ``l`` vectorised (all axes flattened),
    ``eta* = (w.w)(l.w) / ((w.w)(l.l) + 2 (l.w)^2)``, the minimiser of the first-order
    expansion of ``||(W - eta L)(W - eta L)^T - I||_F`` (Eqs. 18-19). The sums are computed in
    the inputs' dtype (at least float32). A zero denominator (zero weight or zero gradient)
    gives ``eta* = 0``, never NaN. Use ``jax.vmap`` for a batch of pairs.

    Args:
      w: weight, any shape.
      l: gradient, same shape as ``w``.

    Returns:
      Scalar ``eta*``.

    Raises:
      ValueError: if the shapes differ.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.eye(2)
      >>> float(optimal_eta(w, w))  # N t / (N^2 + 2 t^2) with N = t = 2
      0.3333333432674408
    """
    if w.shape != l.shape:
        raise ValueError(f"optimal_eta: shapes differ, {w.shape=} vs {l.shape=}")
    dtype = jnp.promote_types(jnp.result_type(w, l), jnp.float32)
    wv = jnp.ravel(w).astype(dtype)
    lv = jnp.ravel(l).astype(dtype)
    ww, lw, ll = wv @ wv, lv @ wv, lv @ lv
    den = ww * ll + 2.0 * lw * lw
    safe = jnp.where(den > 0, den, jnp.ones_like(den))
    return jnp.where(den > 0, ww * lw / safe, jnp.zeros_like(den))


class OptimalLearningRateState(NamedTuple):
    """State of :func:`optimal_learning_rate`."""

    count: jax.Array  # () int32, number of updates so far
    eta: Any  # pytree like params of () floats: eta used at the last step (0 before)
    inner_state: optax.OptState  # state of the inner transformation


def _eta_dtype(w: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.asarray(w).dtype, jnp.float32)


def _switch(eta_star: jax.Array, lr: Any) -> jax.Array:
    """Eq. 21 as run by the reference: eta* if 0 < eta* < lr else lr (NaN -> lr)."""
    lr = jnp.asarray(lr, eta_star.dtype)
    use_star = (eta_star > 0) & (eta_star < lr)
    return jnp.where(use_star, eta_star, lr)


def optimal_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    *,
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """Optimal Learning Rate (OLR, Eqs. 18-21) as a final ``-eta`` scaling.

    For each leaf, ``eta* = optimal_eta(w, l)`` (Eq. 20) is computed from the current weight
    ``w`` (``params``) and the INCOMING update ``l`` (the raw gradient, or the NOG'd gradient
    when NOG runs before this transform). The switch of Eq. 21, as the reference runs it, is
    ``eta = eta*`` if ``0 < eta* < lr_t`` else ``lr_t``, with ``lr_t`` the learning rate the
    other layers use at this step (a float or an optax schedule evaluated at this
    transform's step count). A zero weight or gradient, or a non-finite ``eta*``, falls back
    to ``lr_t``. The output is ``-eta * inner(l)``: with
    ``inner = chain(add_decayed_weights(wd), trace(momentum))`` eta multiplies the whole
    momentum step ``buf = m buf + (l + wd w)`` exactly as torch.optim.SGD with the layer's
    learning rate replaced by eta (docs/nog_olr.md). ``inner=None`` means identity.

    Proposition 1 erratum (docs/nog_olr.md). The paper states that for orthogonal
    ``W`` and ``l`` with ``N`` rows, ``1/(N^2+2) <= eta* <= N^2/(N^2+2)``. Its proof
    (appendix Eq. 39) assumes ``<l, W>_F >= sigma_min(l) sigma_min(W) = 1``, which is false:
    the Frobenius product of two orthogonal matrices can be anything in ``[-N, N]``. With
    ``t = <l, W>_F``, ``eta* = N t / (N^2 + 2 t^2)``; for ``t > 0`` its exact range is
    ``(0, 1/(2 sqrt 2)]``, maximal at ``t = N / sqrt 2``. The upper bound holds but is loose;
    the lower bound fails for some pairs (tests/test_transforms.py finds counterexamples).

    Args:
      learning_rate: ``lr_t``, a float or an optax schedule ``count -> lr``. Works with
        ``optax.inject_hyperparams(optimal_learning_rate)(learning_rate=...)``.
      inner: transformation applied to the updates before the ``-eta`` scaling (``None``:
        identity). It receives the same ``params``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`OptimalLearningRateState`;
      ``update`` requires ``params`` (``ValueError`` otherwise).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = optimal_learning_rate(0.1)
      >>> w = {"kernel": jnp.eye(2)}
      >>> state = tx.init(w)
      >>> u, state = tx.update({"kernel": jnp.eye(2)}, state, w)
      >>> round(float(state.eta["kernel"]), 4)  # eta* = 1/3 > lr, so the switch keeps lr
      0.1
    """
    inner = optax.identity() if inner is None else inner

    def init_fn(params: optax.Params) -> OptimalLearningRateState:
        eta = jax.tree_util.tree_map(lambda w: jnp.zeros([], _eta_dtype(w)), params)
        return OptimalLearningRateState(
            count=jnp.zeros([], jnp.int32), eta=eta, inner_state=inner.init(params)
        )

    def update_fn(
        updates: optax.Updates,
        state: OptimalLearningRateState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, OptimalLearningRateState]:
        if params is None:
            raise ValueError(
                "optimal_learning_rate: params is None; OLR needs the current weights "
                "(call update(updates, state, params))"
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        eta = jax.tree_util.tree_map(
            lambda g, w: _switch(optimal_eta(w, g).astype(_eta_dtype(w)), lr), updates, params
        )
        inner_updates, inner_state = inner.update(updates, state.inner_state, params)
        new_updates = jax.tree_util.tree_map(
            lambda u, e: (-e * u).astype(u.dtype), inner_updates, eta
        )
        count = optax.safe_int32_increment(state.count)
        return new_updates, OptimalLearningRateState(count, eta, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
