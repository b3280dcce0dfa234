"""Decorrelated batch normalisation: ZCA whitening through the SVD meta-layer.

Implements the whitening layer of the paper's decorrelated-BN application (Appendix B.1,
Eq. 43; docs/applications.md). The layer is a drop-in replacement for
``flax.linen.BatchNorm`` (same fields where they make sense and the same
``__call__(x, use_running_average=None)`` convention), so a ResNet can inject it as its
stem norm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdcond_jax import meta_layer

Array = jax.Array
Initializer = Callable[..., Array]


def _compute_dtype(dtype: Any) -> Any:
    """Float32 for float32/bf16/f16 inputs, float64 when the input already is float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _to_groups(x: Array, groups: int) -> Array:
    """Reshape NHWC-like features (..., C) into (groups, C // groups, N) with N = prod(...)."""
    channels = x.shape[-1]
    flat = x.reshape(-1, channels)  # (N, C)
    return flat.T.reshape(groups, channels // groups, flat.shape[0])


def _from_groups(xg: Array, shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`_to_groups`: (groups, C // groups, N) back to ``shape`` (..., C)."""
    return xg.reshape(-1, xg.shape[-1]).T.reshape(shape)


def group_moments(
    xg: Array, *, epsilon: float, axis_name: str | None = None
) -> tuple[Array, Array]:
    """Mean and regularised covariance of grouped features (Eq. 2 plus eps*I).

    Without ``axis_name`` this is ``meta_layer.covariance`` (centred, Eq. 2). Inside
    pmap/shard_map with ``axis_name`` the first and second moments are averaged over the
    devices with ``lax.pmean`` (all shards must hold the same number of samples), and the
    covariance is E[x x^T] - mu mu^T + eps*I, i.e. the statistic of the global batch.

    Args:
      xg: features of shape (groups, d, N).
      epsilon: ridge added to the diagonal.
      axis_name: mapped axis to average the moments over, or None.

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
        return mean, meta_layer.covariance(xg, layout="features_first", eps=epsilon)
    second = jnp.einsum("gdn,gen->gde", xg, xg) / xg.shape[-1]
    mean, second = jax.lax.pmean((mean, second), axis_name)
    cov = second - mean[..., :, None] * mean[..., None, :]
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    return mean, cov + epsilon * jnp.eye(xg.shape[1], dtype=xg.dtype)


class DecorrelatedBatchNorm(nn.Module):
    """ZCA-whitening batch norm (decorrelated BN), Eq. 43 / docs/applications.md.

    Training mode: the features x of shape (..., C) (NHWC, features last) are flattened to
    X (C, N), N = batch*H*W, split into ``groups`` equal channel groups, and each group is
    whitened with its own statistics: Sigma = X J X^T + eps*I (Eq. 2),
    y = Sigma^{-1/2} (x - mu), with Sigma^{-1/2} from ``meta_layer.inv_sqrtm`` (the SVD
    meta-layer for ``method="eigh"``). A per-channel affine follows. The running mean and
    the running whitening matrix are exponential moving averages
    (new = momentum*old + (1-momentum)*batch) stored in ``batch_stats`` under ``"mean"``
    (C,) and ``"whitening"`` (groups, C/groups, C/groups); evaluation computes
    y = W_running (x - mean_running). Statistics are taken in float32 (or float64) even
    for bf16 inputs.

    Attributes:
      use_running_average: evaluate with running statistics (may be given at call time).
      momentum: EMA decay of the running statistics (0.9 = PyTorch momentum 0.1).
      epsilon: eps*I added to the covariance (1e-2 in the paper's experiment).
      groups: number of channel groups whitened separately (C % groups must be 0).
      method: meta-layer method, one of ``meta_layer.METHODS``.
      method_kwargs: extra options for the meta-layer method.
      axis_name: mapped axis for global statistics under pmap/shard_map (under plain
        ``jit`` with a sharded batch the statistics are global automatically).
      use_scale: learn a per-channel scale.
      use_bias: learn a per-channel bias.
      dtype: output dtype (default: the input's dtype).
      param_dtype: dtype of scale and bias.
      scale_init: initializer of the scale.
      bias_init: initializer of the bias.

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

    def _check_input(self, x: Array) -> None:
        if x.ndim < 2:
            raise ValueError(f"x must have a batch and a feature axis; got {x.shape=}")
        if self.groups < 1 or x.shape[-1] % self.groups:
            raise ValueError(
                f"groups={self.groups} must divide the number of channels; got {x.shape=}"
            )
        if self.method not in meta_layer.METHODS:
            raise ValueError(f"method={self.method!r}; valid: {meta_layer.METHODS}")

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Whiten ``x`` (..., C); returns an array of the same shape."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        self._check_input(x)
        channels, size = x.shape[-1], x.shape[-1] // self.groups
        cdtype = _compute_dtype(x.dtype)
        ra_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((channels,), cdtype)
        )
        ra_whitening = self.variable(
            "batch_stats",
            "whitening",
            lambda: jnp.broadcast_to(jnp.eye(size, dtype=cdtype), (self.groups, size, size)),
        )
        xg = _to_groups(x.astype(cdtype), self.groups)  # (G, d, N)
        if use_running_average:
            mean = ra_mean.value.reshape(self.groups, size)
            whitening = ra_whitening.value
        else:
            mean, cov = group_moments(xg, epsilon=self.epsilon, axis_name=self.axis_name)
            whitening = meta_layer.inv_sqrtm(
                cov, method=self.method, **(self.method_kwargs or {})
            )
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(channels)
                ra_whitening.value = m * ra_whitening.value + (1 - m) * whitening
        yg = jnp.einsum("gde,gen->gdn", whitening, xg - mean[..., None])
        y = _from_groups(yg, x.shape)
        return self._affine(y).astype(self.dtype or x.dtype)

    def _affine(self, y: Array) -> Array:
        """Per-channel scale and bias (applied after the whitening)."""
        channels = y.shape[-1]
        if self.use_scale:
            scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
            y = y * scale.astype(y.dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (channels,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y
