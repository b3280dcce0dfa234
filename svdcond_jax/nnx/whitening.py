"""Decorrelated batch normalisation (ZCA whitening, Eq. 43) as a Flax NNX layer.

The NNX version of ``svdcond_jax.nn.DecorrelatedBatchNorm``, a thin wrapper over the same
pure functions (``svdcond_jax.nn.whitening``), with the conventions of ``flax.nnx.BatchNorm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from svdcond_jax.nn import _checks
from svdcond_jax.nn import whitening as _wh

__all__ = ["DecorrelatedBatchNorm"]

Array = jax.Array
Initializer = Callable[..., Array]

_ONES = nnx.initializers.ones_init()
_ZEROS = nnx.initializers.zeros_init()


class DecorrelatedBatchNorm(nnx.Module):
    """ZCA-whitening batch norm (decorrelated BN, Eq. 43, docs/applications.md), NNX.

    Same computation as ``svdcond_jax.nn.DecorrelatedBatchNorm`` (see there): in training
    the features (..., num_features) are whitened per channel group with
    ``(Sigma + eps I)^{-1/2}`` of the batch (the SVD meta-layer for ``method="eigh"``) and
    the running mean / whitening matrix are updated as exponential moving averages; in
    evaluation the running statistics are used; a per-channel affine follows. Statistics are
    computed in float32 (float64 for float64 input) also for bfloat16/float16 input; the
    result is in ``dtype`` (None: the input's dtype). Integer, bool and complex inputs raise
    TypeError; a NaN/inf in a training batch makes the whole output NaN. A training batch
    whose statistics are not finite leaves the running mean and whitening matrix as they
    were and increments ``nonfinite_batches`` (``svdcond_jax.nn.whitening
    .finite_or_previous``): ``optax.apply_if_finite`` or ``nnx.Optimizer`` protect the
    parameters, this protects the statistics.

    Like ``nnx.BatchNorm``: ``use_running_average`` is set by the constructor (default
    False), switched by ``model.train()`` / ``model.eval()`` and overridable per call.

    Attributes:
      mean: ``nnx.BatchStat`` (num_features,), the running mean.
      whitening: ``nnx.BatchStat`` (groups, d, d), d = num_features / groups, the running
        whitening matrix (identity at construction).
      nonfinite_batches: ``nnx.BatchStat`` int32 scalar, training batches whose statistics
        were not finite (kept out of the running statistics).
      scale, bias: ``nnx.Param`` (num_features,) or None.

    Args:
      num_features: channels C (>= 1, divisible by ``groups``).
      use_running_average: evaluation mode.
      momentum: EMA decay of the running statistics, in [0, 1].
      epsilon: eps >= 0 added to the covariance.
      relative_epsilon: add eps * trace(Sigma) / d instead (scale-free, Linen's docs).
      groups: channel groups whitened separately.
      method: meta-layer method (``meta_layer.METHODS``).
      method_kwargs: options of the method.
      axis_name: mapped axis for global statistics under pmap/shard_map.
      use_scale: learn a per-channel scale.
      use_bias: learn a per-channel bias.
      dtype: dtype of the result (None: the input's).
      param_dtype: dtype of scale and bias; the running statistics are float32 (float64 if
        ``param_dtype`` is float64).
      scale_init: initializer of the scale.
      bias_init: initializer of the bias.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Raises:
      TypeError / ValueError: at construction for a bad argument (naming it); at call time
        for a non-floating ``x``, the wrong channel count, an empty batch, or a training
        batch of fewer than 2 samples.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> layer = DecorrelatedBatchNorm(3, epsilon=0.0, rngs=nnx.Rngs(0))
      >>> y = layer(jax.random.normal(jax.random.key(0), (8, 4, 4, 3)))
      >>> y.shape, layer.whitening.shape
      ((8, 4, 4, 3), (1, 3, 3))
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        momentum: float = 0.9,
        epsilon: float = 1e-2,
        relative_epsilon: bool = False,
        groups: int = 1,
        method: str = "eigh",
        method_kwargs: dict[str, Any] | None = None,
        axis_name: str | None = None,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init: Initializer = _ONES,
        bias_init: Initializer = _ZEROS,
        rngs: nnx.Rngs,
    ):
        where = type(self).__name__
        _checks.check_int(where, "num_features", num_features, 1)
        _wh._check_decorrelated_batch_norm(
            where, momentum=momentum, epsilon=epsilon, groups=groups, method=method,
            method_kwargs=method_kwargs, dtype=dtype, param_dtype=param_dtype,
            relative_epsilon=relative_epsilon)
        if num_features % groups:
            raise ValueError(f"{where}: groups={groups} must divide "
                             f"num_features={num_features}")
        mean, whitening = _wh.initial_zca_statistics(num_features, groups,
                                                     _checks.compute_dtype(param_dtype))
        self.mean = nnx.BatchStat(mean)
        self.whitening = nnx.BatchStat(whitening)
        self.nonfinite_batches = nnx.BatchStat(jnp.zeros((), jnp.int32))
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale \
            else None
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias \
            else None
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.momentum, self.epsilon, self.groups = momentum, epsilon, groups
        self.relative_epsilon = relative_epsilon
        self.method, self.method_kwargs, self.axis_name = method, method_kwargs, axis_name
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Whiten ``x``.

        Args:
          x: features (..., num_features), real floating.
          use_running_average: True: running statistics; False: batch statistics (and
            update the running ones); None: ``self.use_running_average``.

        Returns:
          An array of ``x``'s shape in ``dtype`` (None: ``x.dtype``).
        """
        where = type(self).__name__
        use_running_average = _checks.mode(where, "use_running_average", use_running_average,
                                           self.use_running_average)
        x = _wh._check_decorrelated_batch_norm_input(
            where, x, groups=self.groups, training=not use_running_average,
            axis_name=self.axis_name)
        if x.shape[-1] != self.num_features:
            raise ValueError(f"{where}: expected {self.num_features} features; "
                             f"got x.shape={x.shape}")
        cdtype = _checks.compute_dtype(x.dtype, self.mean[...].dtype)
        xc = x.astype(cdtype)
        if use_running_average:
            mean, whitening = self.mean[...], self.whitening[...]
        else:
            mean, whitening = _wh.zca_statistics(
                xc, epsilon=self.epsilon, groups=self.groups, method=self.method,
                method_kwargs=self.method_kwargs, axis_name=self.axis_name,
                relative_epsilon=self.relative_epsilon)
            previous = (self.mean[...], self.whitening[...])
            (self.mean[...], self.whitening[...]), self.nonfinite_batches[...] = (
                _wh.finite_or_previous(_wh.ema_update(previous, (mean, whitening),
                                                      self.momentum),
                                       previous, self.nonfinite_batches[...]))
        y = _wh.zca_whiten(xc, mean.astype(cdtype), whitening.astype(cdtype))
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return _wh.channel_affine(y, scale, bias).astype(self.dtype or x.dtype)
