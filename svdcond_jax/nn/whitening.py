"""Decorrelated batch normalisation: ZCA whitening through the SVD meta-layer.

Implements the whitening layer of the paper's decorrelated-BN application (Appendix B.1,
Eq. 43; docs/applications.md). Pure functions (shared with ``svdcond_jax.nnx``):
:func:`zca_statistics` (batch mean and whitening matrix), :func:`zca_whiten`,
:func:`ema_update` (running statistics), :func:`initial_zca_statistics`,
:func:`channel_affine`. :class:`DecorrelatedBatchNorm` is the Linen layer, a drop-in
replacement for ``flax.linen.BatchNorm`` (same fields where they make sense and the same
``__call__(x, use_running_average=None)`` convention), so a ResNet can inject it as its
stem norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdcond_jax import meta_layer
from svdcond_jax.nn import _checks
from svdcond_jax.nn._covariance import covariance

__all__ = [
    "NONFINITE_BATCHES",
    "DecorrelatedBatchNorm",
    "channel_affine",
    "ema_update",
    "finite_or_previous",
    "group_moments",
    "initial_zca_statistics",
    "zca_statistics",
    "zca_whiten",
]

NONFINITE_BATCHES = "nonfinite_batches"
"""Name of the running-statistics counter of batches whose statistics were not finite
(``batch_stats`` entry in Linen, ``nnx.BatchStat`` attribute in NNX)."""

Array = jax.Array
Initializer = Callable[..., Array]

_HIGHEST = jax.lax.Precision.HIGHEST


def _to_groups(x: Array, groups: int) -> Array:
    """Reshape NHWC-like features (..., C) into (groups, C // groups, N) with N = prod(...)."""
    channels = x.shape[-1]
    flat = x.reshape(-1, channels)  # (N, C)
    return flat.T.reshape(groups, channels // groups, flat.shape[0])


def _from_groups(xg: Array, shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`_to_groups`: (groups, C // groups, N) back to ``shape`` (..., C)."""
    return xg.reshape(-1, xg.shape[-1]).T.reshape(shape)


def group_moments(
    xg: Array, *, epsilon: float, axis_name: str | None = None,
    relative_epsilon: bool = False,
) -> tuple[Array, Array]:
    """Mean and regularised covariance of grouped features (Eq. 2 plus eps*I).

    Without ``axis_name`` this is the centred covariance of Eq. 2. Inside pmap/shard_map
    with ``axis_name`` the first and second moments are averaged over the devices with
    ``lax.pmean`` (all shards must hold the same number of samples), and the covariance is
    E[x x^T] - mu mu^T + eps*I, i.e. the statistic of the global batch. With
    ``relative_epsilon`` the ridge is ``eps * trace(Sigma) / d`` (eps times the mean
    eigenvalue), so that kappa(Sigma + ridge) does not change when the features are scaled
    (docs/conditioning.md).

    Args:
      xg: features of shape (groups, d, N).
      epsilon: ridge added to the diagonal (relative to the mean eigenvalue with
        ``relative_epsilon``).
      axis_name: mapped axis to average the moments over, or None.
      relative_epsilon: scale the ridge by trace(Sigma) / d, per group.

    Returns:
      ``(mean, cov)`` of shapes (groups, d) and (groups, d, d).

    Example:
      >>> import jax.numpy as jnp
      >>> mean, cov = group_moments(jnp.ones((1, 2, 5)), epsilon=0.1)
      >>> cov.shape
      (1, 2, 2)
    """
    mean = jnp.mean(xg, axis=-1)
    if axis_name is None:
        cov = covariance(xg)
    else:
        second = jnp.einsum("gdn,gen->gde", xg, xg, precision=_HIGHEST) / xg.shape[-1]
        mean, second = jax.lax.pmean((mean, second), axis_name)
        cov = second - mean[..., :, None] * mean[..., None, :]
        cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    ridge = jnp.asarray(epsilon, cov.dtype)
    if relative_epsilon:
        ridge = ridge * jnp.trace(cov, axis1=-2, axis2=-1)[..., None, None] / cov.shape[-1]
    return mean, cov + ridge * jnp.eye(xg.shape[1], dtype=cov.dtype)


def zca_statistics(
    x: Array,
    *,
    epsilon: float,
    groups: int = 1,
    method: str = "eigh",
    method_kwargs: dict[str, Any] | None = None,
    axis_name: str | None = None,
    relative_epsilon: bool = False,
) -> tuple[Array, Array]:
    """Batch mean and ZCA whitening matrix ``(Sigma + eps I)^{-1/2}`` per channel group.

    The features x (..., C) are flattened to X (C, N), N = prod(x.shape[:-1]), split into
    ``groups`` equal channel groups, and for each Sigma = X J X^T (Eq. 2) and
    ``S = (Sigma + eps I)^{-1/2}`` from ``meta_layer.inv_sqrtm`` (the SVD meta-layer for
    ``method="eigh"``). Computed in x's dtype (pass float32/float64).

    Args:
      x: features (..., C), C divisible by ``groups``.
      epsilon: eps >= 0 added to the covariance.
      groups: channel groups whitened separately.
      method: meta-layer method (``meta_layer.METHODS``).
      method_kwargs: options of the method.
      axis_name: mapped axis for global statistics under pmap/shard_map.
      relative_epsilon: the ridge is eps * trace(Sigma) / d (:func:`group_moments`).

    Returns:
      ``(mean, whitening)`` of shapes (C,) and (groups, C/groups, C/groups).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [-1.0, 2.0]])
      >>> mean, w = zca_statistics(x, epsilon=0.0)  # variances 1 and 4, uncorrelated
      >>> w[0].round(4).tolist()
      [[1.0, 0.0], [0.0, 0.5]]
    """
    channels = x.shape[-1]
    mean, cov = group_moments(_to_groups(x, groups), epsilon=epsilon, axis_name=axis_name,
                              relative_epsilon=relative_epsilon)
    whitening = meta_layer.inv_sqrtm(cov, method=method, **(method_kwargs or {}))
    return mean.reshape(channels), whitening


def zca_whiten(x: Array, mean: Array, whitening: Array) -> Array:
    """``y = S (x - mean)`` per channel group (the ZCA whitening of Eq. 43).

    Args:
      x: features (..., C).
      mean: (C,).
      whitening: (groups, C/groups, C/groups).

    Returns:
      (..., C), in the promoted dtype of the arguments.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[[2.0, 0.0], [0.0, 0.5]]])
      >>> zca_whiten(jnp.array([[1.0, 3.0]]), jnp.array([0.0, 1.0]), w).tolist()
      [[2.0, 1.0]]
    """
    groups, size = whitening.shape[0], whitening.shape[-1]
    xg = _to_groups(x, groups) - mean.reshape(groups, size)[..., None]
    return _from_groups(jnp.einsum("gde,gen->gdn", whitening, xg, precision=_HIGHEST), x.shape)


def ema_update(running: Any, batch: Any, momentum: float) -> Any:
    """Running statistics ``momentum * running + (1 - momentum) * batch`` (pytrees).

    The result carries no gradient. Flax momentum 0.9 is PyTorch momentum 0.1.

    Args:
      running: current running statistics.
      batch: this batch's statistics (same structure).
      momentum: in [0, 1].

    Returns:
      The updated statistics, in the dtypes of ``running``.

    Example:
      >>> import jax.numpy as jnp
      >>> float(ema_update(jnp.array(1.0), jnp.array(3.0), 0.75))
      1.5
    """
    return jax.tree.map(
        lambda r, b: jax.lax.stop_gradient(momentum * r + (1 - momentum) * b).astype(r.dtype),
        running, batch)


def finite_or_previous(new: Any, previous: Any, count: Array) -> tuple[Any, Array]:
    """Running statistics that a non-finite batch cannot poison.

    ``new`` (the updated running statistics) when every one of its entries is finite, else
    ``previous`` unchanged, with ``count + 1``: one NaN/Inf training batch would otherwise
    make an exponential moving average non-finite for good (``optax.apply_if_finite``
    protects parameters, not statistics). Decided inside the traced computation (one
    ``jnp.where`` per leaf on a single flag, no host round trip); under pmap/shard_map with
    ``axis_name`` the statistics, hence the decision, are the same on every device.

    Args:
      new: the updated running statistics (a pytree of arrays).
      previous: the running statistics before the update (same structure).
      count: int32 scalar, batches rejected so far.

    Returns:
      ``(statistics, count)``.

    Example:
      >>> import jax.numpy as jnp
      >>> stats, count = finite_or_previous(jnp.array([jnp.nan, 1.0]), jnp.zeros(2),
      ...                                   jnp.int32(0))
      >>> stats.tolist(), int(count)
      ([0.0, 0.0], 1)
    """
    leaves = jax.tree.leaves(new)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.array(True)
    kept = jax.tree.map(lambda n, p: jnp.where(finite, n, p), new, previous)
    return kept, count + (~finite).astype(count.dtype)


def initial_zca_statistics(channels: int, groups: int, dtype: Any) -> tuple[Array, Array]:
    """Running statistics before any update: mean 0 and identity whitening matrices.

    Args:
      channels: C.
      groups: channel groups (must divide C).
      dtype: dtype of the statistics.

    Returns:
      ``(mean, whitening)`` of shapes (C,) and (groups, C/groups, C/groups).

    Example:
      >>> import jax.numpy as jnp
      >>> [a.shape for a in initial_zca_statistics(6, 2, jnp.float32)]
      [(6,), (2, 3, 3)]
    """
    size = channels // groups
    return (jnp.zeros((channels,), dtype),
            jnp.broadcast_to(jnp.eye(size, dtype=dtype), (groups, size, size)))


def channel_affine(y: Array, scale: Array | None, bias: Array | None) -> Array:
    """Per-channel ``y * scale + bias`` over the last axis (None skips a term).

    Args:
      y: (..., C).
      scale: (C,) or None.
      bias: (C,) or None.

    Returns:
      (..., C) in ``y``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> channel_affine(jnp.ones((1, 2)), jnp.array([2.0, 3.0]), None).tolist()
      [[2.0, 3.0]]
    """
    if scale is not None:
        y = y * scale.astype(y.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def _check_decorrelated_batch_norm(where: str, *, momentum: Any, epsilon: Any, groups: Any,
                                  method: Any, method_kwargs: Any, dtype: Any,
                                  param_dtype: Any, relative_epsilon: Any = False) -> None:
    """Static arguments of decorrelated BN (Linen and NNX)."""
    _checks.check_real(where, "momentum", momentum, low=0.0, high=1.0)
    _checks.check_real(where, "epsilon", epsilon, low=0.0)
    _checks.check_bool(where, "relative_epsilon", relative_epsilon)
    _checks.check_int(where, "groups", groups, 1)
    _checks.check_method(where, method, method_kwargs)
    _checks.check_dtype(where, "dtype", dtype)
    _checks.check_dtype(where, "param_dtype", param_dtype, optional=False)


def _check_decorrelated_batch_norm_input(where: str, x: Any, *, groups: int, training: bool,
                                        axis_name: str | None) -> Array:
    """Input of decorrelated BN: real floating (..., C), C % groups == 0, at least 1 sample
    per channel (an empty batch raises in evaluation too), and in training at least 2 (1 per
    device with ``axis_name``)."""
    x = _checks.check_input(where, x, min_ndim=2)
    if x.shape[-1] % groups:
        raise ValueError(f"{where}: groups={groups} must divide the number of channels; "
                         f"got x.shape={x.shape}")
    samples = math.prod(x.shape[:-1])
    if training:
        needed, what = (1 if axis_name is not None else 2), "batch statistics need"
    else:
        needed, what = 1, "evaluation (running statistics) needs"
    if samples < needed:
        raise ValueError(f"{where}: {what} at least {needed} sample{'s' * (needed > 1)} per "
                         f"channel; got x.shape={x.shape} ({samples} samples)")
    return x


class DecorrelatedBatchNorm(nn.Module):
    """ZCA-whitening batch norm (decorrelated BN), Eq. 43 / docs/applications.md.

    Training mode: the features x of shape (..., C) (NHWC, features last) are flattened to
    X (C, N), N = prod(x.shape[:-1]), split into ``groups`` equal channel groups, and each
    group is whitened with its own statistics: Sigma = X J X^T + eps*I (Eq. 2),
    y = Sigma^{-1/2} (x - mu), with Sigma^{-1/2} from ``meta_layer.inv_sqrtm`` (the SVD
    meta-layer for ``method="eigh"``); see :func:`zca_statistics`. A per-channel affine
    follows. The running mean and the running whitening matrix are exponential moving
    averages (:func:`ema_update`: new = momentum*old + (1-momentum)*batch) stored in
    ``batch_stats`` under ``"mean"`` (C,) and ``"whitening"`` (groups, C/groups, C/groups);
    evaluation computes y = W_running (x - mean_running). A training batch whose
    statistics are not finite (a NaN/Inf input, a failed decomposition) leaves both running
    statistics as they were and increments the int32 counter ``batch_stats`` entry
    ``"nonfinite_batches"`` (:func:`finite_or_previous`), so one bad batch cannot poison
    evaluation, also in a loop that takes ``batch_stats`` from ``mutable=`` unconditionally.

    dtypes: statistics and whitening are computed in float32 (float64 for float64 input),
    also for bfloat16/float16 input; the result is in ``dtype`` (None: the input's dtype).
    Integer, bool and complex inputs raise TypeError. Values: a NaN/inf anywhere in a
    training batch makes the whole output NaN (the statistics are shared) and is counted,
    not averaged in (above); in evaluation it stays in its own sample.

    Attributes:
      use_running_average: evaluate with running statistics (may be given at call time).
      momentum: EMA decay of the running statistics, in [0, 1] (0.9 = PyTorch momentum 0.1).
      epsilon: eps*I >= 0 added to the covariance (1e-2 in the paper's experiment).
      relative_epsilon: add eps * trace(Sigma) / d instead (eps times the mean
        eigenvalue), which does not follow the features' scale (docs/conditioning.md).
      groups: number of channel groups whitened separately (C % groups must be 0).
      method: meta-layer method, one of ``meta_layer.METHODS``.
      method_kwargs: extra options for the meta-layer method.
      axis_name: mapped axis for global statistics under pmap/shard_map (under plain
        ``jit`` with a sharded batch the statistics are global automatically).
      use_scale: learn a per-channel scale.
      use_bias: learn a per-channel bias.
      dtype: dtype of the result (None: the input's dtype).
      param_dtype: dtype of scale and bias.
      scale_init: initializer of the scale.
      bias_init: initializer of the bias.

    Raises:
      TypeError / ValueError: at construction for a bad attribute (naming it); at call
        time for a non-floating ``x``, fewer than 2 dims, channels not divisible by
        ``groups``, an empty batch, or a training batch of fewer than 2 samples.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = DecorrelatedBatchNorm(use_running_average=False, epsilon=0.0)
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> y.shape, updates["batch_stats"]["whitening"].shape
      ((8, 4, 4, 3), (1, 3, 3))
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-2
    relative_epsilon: bool = False
    groups: int = 1
    method: str = "eigh"
    method_kwargs: dict[str, Any] | None = None
    axis_name: str | None = None
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    def __post_init__(self) -> None:
        _check_decorrelated_batch_norm(
            type(self).__name__, momentum=self.momentum, epsilon=self.epsilon,
            groups=self.groups, method=self.method, method_kwargs=self.method_kwargs,
            dtype=self.dtype, param_dtype=self.param_dtype,
            relative_epsilon=self.relative_epsilon)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Whiten ``x``.

        Args:
          x: features (..., C), real floating.
          use_running_average: if True use the running statistics, else the batch's (and
            update the running ones, with ``mutable=["batch_stats"]``); overrides the
            attribute.

        Returns:
          An array of ``x``'s shape in ``dtype`` (None: ``x.dtype``).
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = _check_decorrelated_batch_norm_input(
            type(self).__name__, x, groups=self.groups, training=not use_running_average,
            axis_name=self.axis_name)
        cdtype = _checks.compute_dtype(x.dtype)
        initial = initial_zca_statistics(x.shape[-1], self.groups, cdtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: initial[0])
        ra_whitening = self.variable("batch_stats", "whitening", lambda: initial[1])
        ra_count = self.variable("batch_stats", NONFINITE_BATCHES,
                                 lambda: jnp.zeros((), jnp.int32))
        xc = x.astype(cdtype)
        if use_running_average:
            mean, whitening = ra_mean.value, ra_whitening.value
        else:
            mean, whitening = zca_statistics(
                xc, epsilon=self.epsilon, groups=self.groups, method=self.method,
                method_kwargs=self.method_kwargs, axis_name=self.axis_name,
                relative_epsilon=self.relative_epsilon)
            if not self.is_initializing():
                previous = (ra_mean.value, ra_whitening.value)
                (ra_mean.value, ra_whitening.value), ra_count.value = finite_or_previous(
                    ema_update(previous, (mean, whitening), self.momentum), previous,
                    ra_count.value)
        y = zca_whiten(xc, mean.astype(cdtype), whitening.astype(cdtype))
        channels = (x.shape[-1],)
        scale = (self.param("scale", self.scale_init, channels, self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", self.bias_init, channels, self.param_dtype)
                if self.use_bias else None)
        return channel_affine(y, scale, bias).astype(self.dtype or x.dtype)
