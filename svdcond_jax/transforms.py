"""optax transforms for NOG (Eqs. 14-17) and OLR (Eqs. 18-21), leaf by leaf.

* :func:`nearest_orthogonal_gradient` replaces each gradient leaf by its polar factor; it
  goes first in a chain, on the raw gradient (or, Muon's way, after :func:`ema_momentum`).
* :func:`optimal_learning_rate` is a complete SGD optimizer (weight decay, momentum, and the
  step, already negated) whose learning rate is the optimal ``eta`` of Eq. 20 clipped by the
  switch of Eq. 21, per leaf. It goes where ``optax.sgd`` would go, last in the chain.
* :func:`ema_momentum` and :func:`scale_by_shape` are optax.contrib.muon's conventions
  (momentum before orthogonalising, width scaling), for the all-layer recipes.

Every transform acts on each leaf it is given and knows nothing of which leaves those are:
the paper applies NOG and OLR to the Pre-SVD parameter only
(:func:`~svdcond_jax.optimizers.pre_svd_sgd`, :func:`~svdcond_jax.optimizers.pre_svd_optimizer`),
:func:`~svdcond_jax.optimizers.nog_optimizer` to every conv and dense kernel; the selection
lives in :mod:`svdcond_jax.optimizers`. See docs/nog_olr.md.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from svdcond_jax._paths import array_leaves_with_paths
from svdcond_jax.orthogonal import POLAR_METHODS, _check_polar_options, as_matrix, polar_factor

__all__ = [
    "EmaMomentumState",
    "OptimalLearningRateState",
    "ema_momentum",
    "nearest_orthogonal_gradient",
    "optimal_eta",
    "optimal_learning_rate",
    "scale_by_shape",
]


# ------------------------------------------------------------------------ argument checks


def _is_real_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _check_float_leaves(fn: str, what: str, tree: Any) -> None:
    """TypeError naming the path of any leaf that is not a real floating array."""
    for path, x in array_leaves_with_paths(tree):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not _is_real_float(dtype):
            raise TypeError(
                f"{fn}: {what} {path!r} has dtype {dtype}; a real floating dtype "
                "(float16/bfloat16/float32/float64) is required"
            )


def _check_real(fn: str, name: str, value: Any, *, low: float, low_open: bool = False,
                high: float | None = None) -> None:
    """Checks a scalar hyperparameter at construction time.

    Python numbers and concrete arrays must lie in ``[low, high)`` (``(low, high)`` when
    ``low_open``); traced arrays (``optax.inject_hyperparams`` under ``jit``) cannot be
    checked here and are checked by :func:`_hyper_ok` at run time instead.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real | jax.Array | np.ndarray):
        raise TypeError(
            f"{fn}: {name} must be a real number, got {name}={value!r} ({type(value).__name__})"
        )
    if isinstance(value, jax.Array | np.ndarray):
        if value.shape != ():
            raise ValueError(f"{fn}: {name} must be a scalar, got shape {value.shape}")
        if not (_is_real_float(value.dtype) or jnp.issubdtype(value.dtype, jnp.integer)):
            raise TypeError(f"{fn}: {name} must be real, got dtype {value.dtype}")
        if isinstance(value, jax.core.Tracer):
            return
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high else "")
        raise ValueError(f"{fn}: {name} must be finite and {bound}, got {name}={value!r}")


def _check_learning_rate(fn: str, learning_rate: Any) -> None:
    """A float must be finite and > 0; a scalar array (a schedule's value injected by
    ``optax.inject_hyperparams``) finite and >= 0; a schedule is checked at run time."""
    if callable(learning_rate):
        return
    if isinstance(learning_rate, optax.GradientTransformation):
        raise TypeError(
            f"{fn}: learning_rate must be a float or a schedule, got a "
            "GradientTransformation; OLR is itself the optimizer of its parameters"
        )
    is_array = isinstance(learning_rate, jax.Array | np.ndarray)
    _check_real(fn, "learning_rate", learning_rate, low=0.0, low_open=not is_array)


def _check_sgd_hyperparams(fn: str, learning_rate: Any, momentum: Any, weight_decay: Any) -> None:
    _check_learning_rate(fn, learning_rate)
    _check_real(fn, "momentum", momentum, low=0.0, high=1.0)
    _check_real(fn, "weight_decay", weight_decay, low=0.0)


def _hyper_ok(lr: Any, momentum: Any, weight_decay: Any) -> jax.Array:
    """Run-time check of values that only jit knows: lr_t >= 0, 0 <= m < 1, wd >= 0."""
    lr, m, wd = (jnp.asarray(x, jnp.float32) for x in (lr, momentum, weight_decay))
    return (
        jnp.isfinite(lr) & (lr >= 0) & (m >= 0) & (m < 1) & jnp.isfinite(wd) & (wd >= 0)
    )


def _descent_scale(
    learning_rate: optax.ScalarOrSchedule, momentum: Any, weight_decay: Any
) -> optax.GradientTransformation:
    """``optax.scale_by_learning_rate`` whose step is NaN when a traced hyperparameter is
    out of range (a negative rate would ascend silently)."""

    def neg_lr(count: jax.Array) -> jax.Array:
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.result_type(float))
        return jnp.where(_hyper_ok(lr, momentum, weight_decay), -lr, jnp.nan)

    return optax.scale_by_schedule(neg_lr)


# ------------------------------------------------------------------------------------ NOG


def _polar_leaf(g: jax.Array, kwargs: dict[str, Any]) -> jax.Array:
    """Polar factor of ``as_matrix(g)`` in at least float32, NaN for non-finite ``g``."""
    if g.size == 0:
        return g
    x = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    # The polar factor is scale-invariant: dividing by max|g| keeps Newton-Schulz's Frobenius
    # norm from overflowing (huge g) or underflowing (tiny g), which would return zeros.
    scale = jnp.max(jnp.abs(x))
    finite = jnp.isfinite(scale)
    x = jnp.where(finite & (scale > 0), x / jnp.where(scale > 0, scale, 1), jnp.zeros_like(x))
    m, back = as_matrix(x)
    r = back(polar_factor(m, **kwargs))  # never sees Inf: LAPACK's SVD does not return on Inf
    return jnp.where(finite, r, jnp.nan).astype(g.dtype)


def nearest_orthogonal_gradient(
    *, method: str = "svd", num_iters: int | None = None, rtol: float | None = None,
    matmul_dtype: Any = None,
) -> optax.GradientTransformation:
    """Nearest Orthogonal Gradient (NOG, Eqs. 14-17).

    Every leaf ``g`` is reshaped with :func:`~svdcond_jax.orthogonal.as_matrix` to
    ``(prod(shape[:-1]), shape[-1])``, replaced by its polar factor ``U V^T`` (all singular
    values set to 1, no rescaling by the gradient norm) and reshaped back. The paper places
    it FIRST, on the raw gradient, before weight decay, momentum and
    :func:`optimal_learning_rate` (docs/nog_olr.md), on the Pre-SVD parameter only
    (``optax.partition`` or ``optax.masked``); Muon orthogonalises the momentum instead
    (after :func:`ema_momentum`). It transforms every leaf it receives.

    Values: a zero gradient gives a zero update; a gradient with any NaN or Inf gives an
    all-NaN update (so that ``optax.apply_if_finite`` skips the step). The polar factor is
    scale-invariant, so the gradient is divided by ``max|g|`` first: huge or tiny finite
    gradients are handled exactly. bfloat16/float16 gradients are computed in float32 and
    returned in their own dtype.

    Args:
      method: ``"svd"`` (exact), ``"newton_schulz"`` (converged), ``"polar_express"``
        (fast: within 7.6e-3 of the polar factor on singular values down to 3e-3 of the
        largest, at optax.contrib.muon's cost) or ``"muon"`` (optax.contrib.muon's
        approximation), see :func:`~svdcond_jax.orthogonal.polar_factor`.
      num_iters: steps of ``"newton_schulz"`` or ``"muon"``, ``>= 1`` (``None``:
        polar_factor's default).
      rtol: forwarded to ``polar_factor(..., rtol=rtol)`` when not ``None``: singular values
        below ``rtol * sigma_max`` are treated as zero (rank-aware NOG). ``0 <= rtol < 1``
        (``"polar_express"``: [1.76e-5, 5.9e-3); ``"muon"``: none).
      matmul_dtype: ``"polar_express"``/``"muon"`` only: e.g. ``jnp.bfloat16`` products
        with float32 accumulation (accelerators).

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      ValueError: at construction, for an unknown ``method``, ``num_iters < 1`` or
        ``num_iters`` with ``method="svd"``/``"polar_express"``, ``rtol`` outside ``[0, 1)``
        or the method's range, ``matmul_dtype`` with ``"svd"``/``"newton_schulz"``; in
        ``init`` and ``update``, naming the parameter path, for a leaf with ``ndim < 2``.
      TypeError: for a non-integer ``num_iters``, a non-real ``rtol``, a non-floating
        ``matmul_dtype``, or (naming the path) a leaf whose dtype is not real floating
        (int, bool, complex).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = nearest_orthogonal_gradient()
      >>> g = {"kernel": jnp.array([[3.0, 0.0], [0.0, 0.1]])}
      >>> u, _ = tx.update(g, tx.init(g))
      >>> u["kernel"].tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    fn = "nearest_orthogonal_gradient"
    if not isinstance(method, str) or method not in POLAR_METHODS:
        raise ValueError(f"{fn}: unknown method={method!r}; valid methods are {POLAR_METHODS}")
    kwargs: dict[str, Any] = {"method": method}
    if num_iters is not None:
        if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral):
            raise TypeError(f"{fn}: num_iters must be an int, got num_iters={num_iters!r}")
        if num_iters < 1:
            raise ValueError(f"{fn}: num_iters must be >= 1, got num_iters={num_iters}")
        if method not in ("newton_schulz", "muon"):
            raise ValueError(
                f"{fn}: num_iters={num_iters} only applies to method='newton_schulz' or "
                f"'muon', got method={method!r}"
            )
        kwargs["num_iters"] = int(num_iters)
    if rtol is not None:
        _check_real(fn, "rtol", rtol, low=0.0, high=1.0)
        kwargs["rtol"] = float(rtol)
    if matmul_dtype is not None:
        kwargs["matmul_dtype"] = matmul_dtype
    try:  # the method-specific ranges, now rather than at the first update
        _check_polar_options(method, kwargs.get("num_iters"), kwargs.get("rtol"),
                             matmul_dtype)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{fn}: {err}") from None

    def check(what: str, tree: Any) -> None:
        _check_float_leaves(fn, what, tree)
        for path, x in array_leaves_with_paths(tree):
            if x.ndim < 2:
                raise ValueError(
                    f"{fn}: {what} {path!r} has shape {x.shape}; NOG needs ndim >= 2 "
                    "(select only the Pre-SVD kernel with optax.partition or optax.masked)"
                )

    def init_fn(params: optax.Params) -> optax.EmptyState:
        check("parameter", params)
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        check("update", updates)
        return jax.tree_util.tree_map(lambda g: _polar_leaf(g, kwargs), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------- Muon's conventions


class EmaMomentumState(NamedTuple):
    """State of :func:`ema_momentum`: step count and the exponential moving average."""

    count: jax.Array
    mu: Any


EmaMomentumState.count.__doc__ = "int32 scalar: number of updates so far."
EmaMomentumState.mu.__doc__ = (
    "Pytree like params (at least float32): mu = beta * mu + (1 - beta) * g, zeros before "
    "the first step (not bias-corrected; the output is)."
)


def ema_momentum(beta: float = 0.95, *, nesterov: bool = True) -> optax.GradientTransformation:
    """Momentum as optax.contrib.muon accumulates it, to orthogonalise afterwards.

    Per leaf, at step ``t >= 1``: ``mu_t = beta mu_(t-1) + (1 - beta) g_t`` and the output
    ``mu_t / (1 - beta^t)`` or, with ``nesterov`` (Muon's default),
    ``beta mu_t / (1 - beta^(t+1)) + (1 - beta) g_t / (1 - beta^t)`` -- exactly
    ``optax.contrib.scale_by_muon``'s, so that
    ``chain(ema_momentum(b), nearest_orthogonal_gradient(method="muon"))`` is its update.
    The paper's NOG instead orthogonalises the raw gradient and lets SGD's momentum
    (``optax.trace``) average the orthogonalised ones (docs/nog_olr.md, "NOG and Muon").

    Args:
      beta: decay in ``[0, 1)``.
      nesterov: Nesterov's look-ahead, as optax.contrib.muon computes it.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`EmaMomentumState`.

    Raises:
      ValueError, TypeError: at construction, for ``beta`` outside ``[0, 1)`` or not a
        number, a non-bool ``nesterov``; in ``init``/``update``, naming the path, for a
        leaf whose dtype is not real floating.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = ema_momentum(0.5, nesterov=False)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update({"w": jnp.ones(2)}, state)
      >>> u["w"].tolist()  # the bias correction undoes the (1 - beta) of the first step
      [1.0, 1.0]
    """
    fn = "ema_momentum"
    _check_real(fn, "beta", beta, low=0.0, high=1.0)
    if not isinstance(nesterov, bool | np.bool_):
        raise TypeError(f"{fn}: nesterov must be a bool, got nesterov={nesterov!r}")

    def init_fn(params: optax.Params) -> EmaMomentumState:
        _check_float_leaves(fn, "parameter", params)
        mu = jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, _work_dtype(w)), params)
        return EmaMomentumState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates: optax.Updates, state: EmaMomentumState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, EmaMomentumState]:
        del params
        _check_float_leaves(fn, "update", updates)
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)

        def leaf(g: jax.Array, mu: jax.Array) -> tuple[jax.Array, jax.Array]:
            g32 = g.astype(mu.dtype)
            mu = beta * mu + (1 - beta) * g32
            if nesterov:
                out = (beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g32 / (1 - beta**t))
            else:
                out = mu / (1 - beta**t)
            return out.astype(g.dtype), mu

        treedef = jax.tree_util.tree_structure(updates)
        pairs = [leaf(g, m) for g, m in zip(treedef.flatten_up_to(updates),
                                            treedef.flatten_up_to(state.mu), strict=True)]
        out, mu = (treedef.unflatten([p[i] for p in pairs]) for i in range(2))
        return out, EmaMomentumState(count, mu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape() -> optax.GradientTransformation:
    """Muon's width scaling: each leaf times ``sqrt(max(1, fan_out / fan_in))``.

    ``(fan_in, fan_out)`` is the shape of :func:`~svdcond_jax.orthogonal.as_matrix` of the
    leaf (``(kh*kw*in, out)`` for an HWIO conv kernel), the reduction and output axes
    ``optax.contrib.muon`` uses for such kernels. Placed after the orthogonalisation, it
    gives a wide layer's (fan_out > fan_in) orthogonal update the size a square one's
    would have per output.

    Returns:
      A stateless ``optax.GradientTransformation``; leaves need ``ndim >= 2``.

    Example:
      >>> import jax.numpy as jnp
      >>> u, _ = scale_by_shape().update({"k": jnp.ones((1, 1, 2, 8))}, None)
      >>> float(u["k"][0, 0, 0, 0])  # sqrt(8 / 2)
      2.0
    """
    fn = "scale_by_shape"

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: optax.Updates, state: Any,
                  params: optax.Params | None = None) -> tuple[optax.Updates, Any]:
        del params
        for path, x in array_leaves_with_paths(updates):
            if x.ndim < 2:
                raise ValueError(f"{fn}: update {path!r} has shape {x.shape}; needs ndim >= 2")

        def leaf(u: jax.Array) -> jax.Array:
            fan_in, fan_out = math.prod(u.shape[:-1]), u.shape[-1]
            return (u * math.sqrt(max(1.0, fan_out / fan_in))).astype(u.dtype)

        return jax.tree_util.tree_map(leaf, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------- optimal eta


def _eta_star(w: jax.Array, l: jax.Array) -> jax.Array:  # noqa: E741
    """Eq. 20 in the inputs' (floating) dtype; no checks. See :func:`optimal_eta`."""
    wv, lv = jnp.ravel(w), jnp.ravel(l)
    # eta*(a w, b l) = (a / b) eta*(w, l): normalise by max|.| so that no sum over- or
    # underflows, then scale back.
    sw = jnp.max(jnp.abs(wv), initial=0.0)
    sl = jnp.max(jnp.abs(lv), initial=0.0)
    finite = jnp.isfinite(sw) & jnp.isfinite(sl)
    one = jnp.ones_like(sw)
    wv = wv / jnp.where(finite & (sw > 0), sw, one)
    lv = lv / jnp.where(finite & (sl > 0), sl, one)
    ww, lw, ll = wv @ wv, lv @ wv, lv @ lv
    den = ww * ll + 2.0 * lw * lw
    unit = jnp.where(den > 0, ww * lw / jnp.where(den > 0, den, one), jnp.zeros_like(den))
    ratio = sw / jnp.where(sl > 0, sl, one)
    star = jnp.where(unit == 0, jnp.zeros_like(unit), unit * ratio)
    return jnp.where(finite, star, jnp.nan)


def optimal_eta(w: jax.Array, l: jax.Array) -> jax.Array:  # noqa: E741
    """Optimal learning rate ``eta*`` of Eq. 20 for weight ``w`` and gradient ``l``.

    With ``w`` and ``l`` vectorised (all axes flattened),
    ``eta* = (w.w)(l.w) / ((w.w)(l.l) + 2 (l.w)^2)``, the minimiser of the first-order
    expansion of ``||(W - eta L)(W - eta L)^T - I||_F`` (Eqs. 18-19). Computed in at least
    float32, after dividing ``w`` and ``l`` by their largest magnitudes
    (``eta*(a w, b l) = (a / b) eta*(w, l)``), so no sum over- or underflows.

    Values: a zero (or empty) weight or gradient gives ``eta* = 0``; a NaN or Inf anywhere
    in ``w`` or ``l`` gives NaN. Use ``jax.vmap`` for a batch of pairs.

    Args:
      w: weight, any shape, real floating dtype.
      l: gradient, same shape as ``w``.

    Returns:
      Scalar ``eta*`` in the inputs' common dtype (bfloat16/float16 inputs are computed in
      float32 and the result cast back).

    Raises:
      ValueError: if the shapes differ.
      TypeError: if a dtype is not real floating (int, bool, complex).

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.eye(2)
      >>> float(optimal_eta(w, w))  # N t / (N^2 + 2 t^2) with N = t = 2
      0.3333333432674408
    """
    w, l = jnp.asarray(w), jnp.asarray(l)  # noqa: E741
    if w.shape != l.shape:
        raise ValueError(f"optimal_eta: shapes differ, w.shape={w.shape} vs l.shape={l.shape}")
    for name, x in (("w", w), ("l", l)):
        if not _is_real_float(x.dtype):
            raise TypeError(f"optimal_eta: {name} must have a real floating dtype, got "
                            f"{name}.dtype={x.dtype}")
    dtype = jnp.result_type(w, l)
    work = jnp.promote_types(dtype, jnp.float32)
    return _eta_star(w.astype(work), l.astype(work)).astype(dtype)


# ------------------------------------------------------------------------------------ OLR


class OptimalLearningRateState(NamedTuple):
    """State of :func:`optimal_learning_rate`: step count, last eta, momentum buffer.

    ``eta`` and ``trace`` are pytrees with the parameters' structure (one leaf per
    parameter, ``optax.MaskedNode`` where ``optax.masked`` hides one). Read the eta with
    :func:`~svdcond_jax.optimizers.find_olr_eta` from any enclosing optimizer state.
    """

    count: jax.Array
    eta: Any
    trace: Any


OptimalLearningRateState.count.__doc__ = (
    "int32 scalar: number of updates so far; a learning-rate schedule is evaluated at it."
)
OptimalLearningRateState.eta.__doc__ = (
    "Pytree like params of float scalars (at least float32): the learning rate used for "
    "each parameter at the last step, eta* of Eq. 20 or the scheduled rate (Eq. 21); "
    "0 before the first step, NaN after a step with non-finite inputs."
)
OptimalLearningRateState.trace.__doc__ = (
    "Pytree like params (at least float32): the momentum buffer buf = momentum * buf + "
    "(g + weight_decay * w), torch.optim.SGD's momentum_buffer; zeros before the first step, "
    "so buf = g + weight_decay * w after it."
)


def _work_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _switch(eta_star: jax.Array, lr: Any) -> jax.Array:
    """Eq. 21 as run by the reference: eta* if 0 < eta* < lr else lr; NaN stays NaN."""
    lr = jnp.asarray(lr, eta_star.dtype)
    use_star = (eta_star > 0) & (eta_star < lr)
    return jnp.where(jnp.isnan(eta_star), eta_star, jnp.where(use_star, eta_star, lr))


def _check_pair(fn: str, updates: Any, params: Any) -> None:
    """Same tree structure, and leaf by leaf the same shape (ValueError naming the path)."""
    u_def, p_def = (jax.tree_util.tree_structure(t) for t in (updates, params))
    if u_def != p_def:
        raise ValueError(
            f"{fn}: updates and params have different tree structures:\n  updates: {u_def}\n"
            f"  params:  {p_def}"
        )
    for (path, u), (_, p) in zip(
        array_leaves_with_paths(updates), array_leaves_with_paths(params), strict=True
    ):
        if u.shape != p.shape:
            raise ValueError(
                f"{fn}: update {path!r} has shape {u.shape} but its parameter has {p.shape}"
            )


def optimal_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    inner: None = None,
) -> optax.GradientTransformation:
    """SGD whose learning rate is the Optimal Learning Rate (OLR, Eqs. 18-21).

    A complete optimizer for the parameters it receives (the Pre-SVD layer): use it exactly
    where ``optax.sgd(...)`` would go; its output is the descent step, already negated, to
    add to the parameters with ``optax.apply_updates``. Per parameter ``w`` with incoming
    gradient ``g`` (the NOG'd gradient when :func:`nearest_orthogonal_gradient` is chained
    before it), at step ``t``, as torch.optim.SGD with its learning rate replaced by eta::

        eta* = optimal_eta(w, g)                            # Eq. 20
        eta  = eta* if 0 < eta* < lr_t else lr_t            # Eq. 21 as the authors run it
        d    = g + weight_decay * w
        buf  = momentum * buf + d                           # buf = d on the first step
        w   <- w - eta * (d + momentum * buf if nesterov else buf)

    ``lr_t`` is the rate of the other layers at this step (a float, or a schedule evaluated
    at this transform's step count). eta comes from the incoming gradient alone, before
    weight decay and momentum, and multiplies the whole momentum step (docs/nog_olr.md).

    Composition. Do not chain it after ``optax.sgd``, ``optax.scale_by_learning_rate``,
    ``optax.scale_by_adam`` or any other transform that negates or rescales the update: it
    would compute eta from the wrong vector (and after a negation step uphill). ``inner=``
    was removed for that reason, and
    :func:`~svdcond_jax.optimizers.check_olr_placement` refuses such a chain (``optax.chain``
    gives OLR no way to see what precedes it when it is built). Natural uses::

        optax.chain(nearest_orthogonal_gradient(),
                    optimal_learning_rate(lr, momentum=0.9, weight_decay=5e-4))
        optax.inject_hyperparams(optimal_learning_rate)(learning_rate=lr, momentum=0.9)

    placed on the Pre-SVD subtree with ``optax.partition`` next to
    ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=m))`` or any other
    optimizer for the rest (see :mod:`svdcond_jax.optimizers`; next to AdamW, ``lr`` is still
    an SGD rate: :func:`~svdcond_jax.optimizers.pre_svd_optimizer`).

    Values (only known under ``jit``): a zero weight or gradient gives ``eta* = 0`` and the
    switch uses ``lr_t``; a NaN/Inf weight or gradient, or a scheduled / injected ``lr_t``
    that is negative or not finite, or an injected ``momentum`` outside ``[0, 1)`` or
    ``weight_decay`` outside ``[0, inf)``, gives ``eta = NaN`` and an all-NaN update (so that
    ``optax.apply_if_finite`` skips it). ``lr_t = 0`` (a warm-up schedule) gives a zero step.
    bfloat16/float16 parameters and gradients are computed in float32 (the state too) and
    the update is returned in the gradient's dtype.

    Proposition 1 erratum (docs/nog_olr.md). The paper states that for orthogonal
    ``W`` and ``l`` with ``N`` rows, ``1/(N^2+2) <= eta* <= N^2/(N^2+2)``. Its proof
    (appendix Eq. 39) assumes ``<l, W>_F >= sigma_min(l) sigma_min(W) = 1``, which is false:
    the Frobenius product of two orthogonal matrices can be anything in ``[-N, N]``. With
    ``t = <l, W>_F``, ``eta* = N t / (N^2 + 2 t^2)``; for ``t > 0`` its exact range is
    ``(0, 1/(2 sqrt 2)]``, maximal at ``t = N / sqrt 2``. The upper bound holds but is loose;
    the lower bound fails for some pairs (tests/test_transforms.py finds counterexamples).

    Args:
      learning_rate: ``lr_t``, a float > 0 or an optax schedule ``count -> lr``. Works with
        ``optax.inject_hyperparams(optimal_learning_rate)(learning_rate=...)``.
      momentum: momentum coefficient in ``[0, 1)``, dampening 0 (torch's default).
      weight_decay: coupled L2 coefficient ``>= 0`` added to the gradient (torch's
        ``weight_decay``); it does not enter eta.
      nesterov: Nesterov momentum as torch computes it (needs ``momentum > 0``).
      inner: removed; passing anything but ``None`` raises ``TypeError``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`OptimalLearningRateState`.

    Raises:
      TypeError: at construction, for ``inner=...`` (removed), a ``learning_rate`` that is
        neither a real number nor a schedule, a non-bool ``nesterov``; in ``init`` /
        ``update``, naming the path, for a leaf whose dtype is not real floating.
      ValueError: at construction, for a float ``learning_rate`` that is not finite and
        > 0, ``momentum`` outside ``[0, 1)``, ``weight_decay < 0`` or not finite,
        ``nesterov`` with ``momentum == 0``; in ``update``, for a missing ``params``, trees
        of different structures, or (naming the path) shapes that differ.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx = optimal_learning_rate(0.1, momentum=0.9)
      >>> w = {"kernel": jnp.eye(2)}
      >>> state = tx.init(w)
      >>> g = {"kernel": jnp.array([[0.05, 1.0], [-1.0, 0.05]])}
      >>> u, state = tx.update(g, state, w)
      >>> round(float(state.eta["kernel"]), 4)  # eta* = 0.2 / 4.03 < lr: the optimal rate
      0.0496
      >>> [round(float(v), 4) for v in u["kernel"].ravel()]  # -eta * g (buf = g at first)
      [-0.0025, -0.0496, 0.0496, -0.0025]
      >>> w = optax.apply_updates(w, u)
    """
    fn = "optimal_learning_rate"
    if inner is not None:
        raise TypeError(
            f"{fn}: inner= was removed. optimal_learning_rate is now a complete SGD optimizer "
            "that returns the descent step itself: replace optimal_learning_rate(lr, "
            "inner=optax.chain(optax.add_decayed_weights(wd), optax.trace(m))) by "
            "optimal_learning_rate(lr, momentum=m, weight_decay=wd), and never wrap "
            "optax.sgd (it negates the update once more and OLR would ascend)"
        )
    _check_sgd_hyperparams(fn, learning_rate, momentum, weight_decay)
    if not isinstance(nesterov, bool | np.bool_):
        raise TypeError(f"{fn}: nesterov must be a bool, got nesterov={nesterov!r}")
    if nesterov and not isinstance(momentum, jax.core.Tracer) and float(momentum) == 0.0:
        raise ValueError(f"{fn}: nesterov=True needs momentum > 0, got momentum={momentum!r}")

    def init_fn(params: optax.Params) -> OptimalLearningRateState:
        _check_float_leaves(fn, "parameter", params)
        eta = jax.tree_util.tree_map(lambda w: jnp.zeros([], _work_dtype(w)), params)
        trace = jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, _work_dtype(w)), params)
        return OptimalLearningRateState(count=jnp.zeros([], jnp.int32), eta=eta, trace=trace)

    def update_fn(
        updates: optax.Updates,
        state: OptimalLearningRateState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, OptimalLearningRateState]:
        if params is None:
            raise ValueError(
                f"{fn}: params is None; OLR needs the current weights "
                "(call update(updates, state, params))"
            )
        _check_float_leaves(fn, "update", updates)
        _check_float_leaves(fn, "parameter", params)
        _check_pair(fn, updates, params)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        ok = _hyper_ok(lr, momentum, weight_decay)

        def leaf(g: jax.Array, w: jax.Array, buf: jax.Array) -> tuple[jax.Array, ...]:
            dtype = buf.dtype
            g32, w32 = g.astype(dtype), w.astype(dtype)
            eta = _switch(_eta_star(w32, g32), lr)
            eta = jnp.where(ok, eta, jnp.nan).astype(dtype)
            d = g32 + weight_decay * w32
            buf = (momentum * buf + d).astype(dtype)
            step = d + momentum * buf if nesterov else buf
            return (-eta * step).astype(g.dtype), eta, buf

        treedef = jax.tree_util.tree_structure(updates)
        triples = [
            leaf(g, w, b)
            for g, w, b in zip(
                treedef.flatten_up_to(updates),
                treedef.flatten_up_to(params),
                treedef.flatten_up_to(state.trace),
                strict=True,
            )
        ]
        new_updates, eta, trace = (
            treedef.unflatten([t[i] for t in triples]) for i in range(3)
        )
        count = optax.safe_int32_increment(state.count)
        return new_updates, OptimalLearningRateState(count, eta, trace)

    return optax.GradientTransformation(init_fn, update_fn)
