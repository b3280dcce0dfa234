"""Global covariance pooling (GCP) head (Appendix B.2, Eq. 44) as a Flax NNX layer.

The NNX version of ``svdcond_jax.nn.CovariancePooling`` and of the Pre-SVD conv factory,
over the same pure GCP representation
(``svdcond_jax.nn.pooling.covariance_sqrt_features``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from svdcond_jax.nn import _checks
from svdcond_jax.nn import pooling as _pool
from svdcond_jax.nn import whitening as _wh
from svdcond_jax.nnx.orthogonal_layers import SkewOrthogonalConv, SpectralNormConv

__all__ = ["CovariancePooling", "apply_pre_svd_conv", "pre_svd_conv"]

Array = jax.Array


def pre_svd_conv(
    pre_svd: str,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The Pre-SVD convolution (no bias) with weight treatment ``pre_svd`` (Sec. 4.2), NNX.

    "none" is ``nnx.Conv``, "sn" is :class:`SpectralNormConv`, "ow" is
    :class:`SkewOrthogonalConv` (stride 1 only). The trainable weight is always the
    ``nnx.Param`` ``kernel``. Apply it with :func:`apply_pre_svd_conv`.

    Args:
      pre_svd: "none" | "sn" | "ow".
      in_features: input channels.
      out_features: output channels.
      kernel_size: int or (kh, kw) (2-D convolution).
      strides: stride (must be 1 for "ow").
      padding: padding of the plain and the spectral-norm conv (SOC pads "SAME").
      dtype: computation dtype of the plain conv and result dtype of all three.
      param_dtype: dtype of the kernel.
      rngs: ``nnx.Rngs``.

    Returns:
      The conv module.

    Raises:
      ValueError: for an unknown ``pre_svd``, a stride other than 1 with "ow", or any bad
        argument of the chosen layer.

    Example:
      >>> from flax import nnx
      >>> conv = pre_svd_conv("sn", 2, 4, 1, rngs=nnx.Rngs(0))
      >>> conv.kernel.shape
      (1, 1, 2, 4)
    """
    where = "pre_svd_conv"
    _pool.check_pre_svd(pre_svd, where)
    kernel = _checks.check_pair(where, "kernel_size", kernel_size)
    if pre_svd == "none":
        _checks.check_pair(where, "strides", strides)
        return nnx.Conv(in_features, out_features, kernel, _checks.pair(strides),
                        padding=padding, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)
    if pre_svd == "sn":
        return SpectralNormConv(in_features, out_features, kernel, strides, padding=padding,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if _checks.check_pair(where, "strides", strides) != (1, 1):
        raise ValueError(f"{where}: pre_svd='ow' (skew orthogonal convolution) supports stride "
                         f"1 only; got strides={strides!r}")
    return SkewOrthogonalConv(in_features, out_features, kernel, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)


def apply_pre_svd_conv(conv: nnx.Module, x: Array, update_stats: bool | None = None) -> Array:
    """Call a :func:`pre_svd_conv` module; ``update_stats`` reaches "sn"/"ow" only.

    Args:
      conv: a module from :func:`pre_svd_conv`.
      x: NHWC input.
      update_stats: training call of "sn"/"ow" (None: the module's own mode); ignored by
        the plain ``nnx.Conv``.

    Returns:
      The conv output.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = pre_svd_conv("none", 2, 4, 1, rngs=nnx.Rngs(0))
      >>> apply_pre_svd_conv(conv, jnp.ones((1, 3, 3, 2)), update_stats=True).shape
      (1, 3, 3, 4)
    """
    if isinstance(conv, nnx.Conv):
        return conv(x)
    return conv(x, update_stats=update_stats)


class CovariancePooling(nnx.Module):
    """GCP head (Appendix B.2, docs/applications.md): reduce conv, BN, ReLU, sqrt-cov, NNX.

    Same computation as ``svdcond_jax.nn.CovariancePooling``: x (B, H, W, in_features) ->
    1x1 Pre-SVD conv to ``dim`` channels without bias (``pre_svd_conv``, treatment
    ``pre_svd``) -> ``nnx.BatchNorm`` (``bn``) -> ReLU (:meth:`pre_svd_features`, what the
    meta-layer decomposes) -> per-image covariance, matrix square root by ``method``, upper
    triangle with the diagonal: (B, dim*(dim+1)/2).

    Like ``nnx.BatchNorm``: ``use_running_average`` (constructor default False, switched by
    ``train()`` / ``eval()``, overridable per call) selects batch or running statistics, and
    a training call also updates the power-iteration vectors of "sn"/"ow". dtypes: conv and
    BN compute in ``dtype`` (None: float32, float64 for float64 input), the covariance and
    square root in float32 (float64), and the result is in ``dtype`` (None: the input's).
    A training batch whose BatchNorm statistics are not finite leaves ``bn.mean`` and
    ``bn.var`` as they were and increments ``nonfinite_batches``.

    Attributes:
      pre_svd_conv: the Pre-SVD conv module (its ``kernel`` is the Pre-SVD parameter).
      bn: the ``nnx.BatchNorm``.
      nonfinite_batches: ``nnx.BatchStat`` int32 scalar, training batches whose BatchNorm
        statistics were not finite (kept out of ``bn``'s running statistics).

    Args:
      in_features: input channels (>= 1).
      dim: channels of the reduction conv (256 in the paper), >= 1.
      method: meta-layer method for the square root (``meta_layer.METHODS``).
      method_kwargs: options of the method.
      pre_svd: "none" | "sn" | "ow".
      momentum: BatchNorm momentum, in [0, 1].
      epsilon: BatchNorm epsilon, >= 0.
      axis_name: BatchNorm axis name for pmap/shard_map.
      use_running_average: evaluation mode.
      dtype: computation dtype of conv and BN and result dtype (None: see above).
      param_dtype: dtype of the conv kernel and the BN scale/bias.
      rngs: ``nnx.Rngs``.

    Raises:
      TypeError / ValueError: at construction for a bad argument (naming it); at call time
        for a non-floating or non-NHWC ``x``, the wrong channel count, fewer than 2
        positions per image, or an empty training batch.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> head = CovariancePooling(16, dim=8, rngs=nnx.Rngs(0))
      >>> head(jnp.ones((2, 4, 4, 16)), use_running_average=True).shape
      (2, 36)
    """

    def __init__(
        self,
        in_features: int,
        dim: int = 256,
        *,
        method: str = "eigh",
        method_kwargs: dict[str, Any] | None = None,
        pre_svd: str = "none",
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        axis_name: str | None = None,
        use_running_average: bool | None = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        where = type(self).__name__
        _checks.check_int(where, "in_features", in_features, 1)
        _pool._check_covariance_pooling(
            where, dim=dim, method=method, method_kwargs=method_kwargs, pre_svd=pre_svd,
            momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype)
        self.pre_svd_conv = pre_svd_conv(pre_svd, in_features, dim, (1, 1), dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(dim, momentum=momentum, epsilon=epsilon, axis_name=axis_name,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.nonfinite_batches = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.in_features, self.dim = in_features, dim
        self.method, self.method_kwargs = method, method_kwargs
        self.use_running_average = use_running_average
        self.dtype = dtype

    def pre_svd_features(self, x: Array, use_running_average: bool | None = None) -> Array:
        """The features whose covariance the meta-layer decomposes: ReLU(BN(conv(x))).

        Args:
          x: (B, H, W, in_features), real floating.
          use_running_average: as in ``__call__`` (a training call updates the statistics).

        Returns:
          (B, H, W, dim) in the computation dtype.
        """
        where = type(self).__name__
        use_running_average = _checks.mode(where, "use_running_average", use_running_average,
                                           self.use_running_average)
        x = _checks.check_input(where, x, ndim=4, layout="(B, H, W, C)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{where}: expected {self.in_features} input channels; "
                             f"got x.shape={x.shape}")
        _pool.check_gcp_batch(where, x, training=not use_running_average)
        cdtype = self.dtype or _checks.compute_dtype(x.dtype)
        y = apply_pre_svd_conv(self.pre_svd_conv, x.astype(cdtype),
                               update_stats=not use_running_average)
        previous = (self.bn.mean[...], self.bn.var[...])
        y = self.bn(y, use_running_average=use_running_average)
        if not use_running_average:
            (self.bn.mean[...], self.bn.var[...]), self.nonfinite_batches[...] = (
                _wh.finite_or_previous((self.bn.mean[...], self.bn.var[...]), previous,
                                       self.nonfinite_batches[...]))
        return nnx.relu(y)

    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Pool NHWC features.

        Args:
          x: (B, H, W, in_features), real floating, H*W >= 2.
          use_running_average: True: evaluation call; False: training call; None:
            ``self.use_running_average``.

        Returns:
          (B, dim*(dim+1)/2) in ``dtype`` (None: ``x.dtype``).
        """
        y = self.pre_svd_features(x, use_running_average)
        out = _pool.covariance_sqrt_features(y, method=self.method,
                                             method_kwargs=self.method_kwargs)
        return out.astype(self.dtype or jnp.result_type(x))
