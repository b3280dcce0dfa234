"""Global covariance pooling (GCP) head: matrix square root of per-image covariances.

Implements the GCP head of the paper's second application (Appendix B.2, Eq. 44;
docs/applications.md): the pure representation :func:`covariance_sqrt_features` (shared
with ``svdcond_jax.nnx``), the Linen head :class:`CovariancePooling`, and the factory
:func:`pre_svd_conv` for the Pre-SVD convolution shared with the ResNets (plain conv,
spectral norm "sn", or orthogonal weight "ow" = skew orthogonal convolution; Sec. 4.2,
docs/weight_treatments.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdcond_jax import meta_layer
from svdcond_jax.nn import _checks
from svdcond_jax.nn._covariance import covariance
from svdcond_jax.nn.orthogonal_layers import SkewOrthogonalConv, SpectralNormConv
from svdcond_jax.nn.whitening import NONFINITE_BATCHES, finite_or_previous

__all__ = [
    "PRE_SVD_TREATMENTS",
    "CovariancePooling",
    "check_pre_svd",
    "covariance_sqrt_features",
    "pre_svd_conv",
    "upper_triangle",
]

Array = jax.Array

PRE_SVD_TREATMENTS = ("none", "sn", "ow")


def check_pre_svd(pre_svd: Any, where: str = "pre_svd_conv") -> None:
    """Raise ValueError unless ``pre_svd`` is one of :data:`PRE_SVD_TREATMENTS`.

    Args:
      pre_svd: the treatment name to check.
      where: the caller, named in the message.

    Raises:
      ValueError: for any other value.

    Example:
      >>> check_pre_svd("ow")
    """
    _checks.check_choice(where, "pre_svd", pre_svd, PRE_SVD_TREATMENTS)


def pre_svd_conv(
    x: Array,
    *,
    pre_svd: str,
    features: int,
    kernel_size: tuple[int, int],
    update_stats: bool,
    name: str,
    strides: int | tuple[int, int] = 1,
    padding: Any = "SAME",
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Array:
    """Build and apply the Pre-SVD convolution (no bias) inside a compact method.

    ``pre_svd`` selects the weight treatment of Sec. 4.2: "none" is ``nn.Conv``, "sn" is
    ``SpectralNormConv`` (W / sigma_max(W)), "ow" is ``SkewOrthogonalConv`` (orthogonal
    conv, stride 1 only). In every case the trainable weight is the param
    ``<name>/kernel``, the one NOG and OLR act on.

    Args:
      x: NHWC input.
      pre_svd: "none" | "sn" | "ow".
      features: output channels.
      kernel_size: spatial kernel size.
      update_stats: a training call: update the power-iteration vectors of "sn"/"ow"
        (and use the SOC's training series length); ignored by "none".
      name: submodule name, fixed so that the parameter path is stable.
      strides: stride (must be 1 for "ow").
      padding: padding of the plain and the spectral-norm conv (SOC pads "SAME").
      dtype: computation dtype of the plain conv and result dtype of all three (None:
        inferred from the input and params).
      param_dtype: dtype of the kernel.

    Returns:
      The conv output, NHWC with ``features`` channels.

    Raises:
      ValueError: for an unknown ``pre_svd``, a stride other than 1 with "ow", or any bad
        argument of the chosen layer.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return pre_svd_conv(x, pre_svd="none", features=4, kernel_size=(1, 1),
      ...                             update_stats=True, name="pre_svd_conv")
      >>> v = Net().init(jax.random.key(0), jnp.ones((1, 3, 3, 2)))
      >>> v["params"]["pre_svd_conv"]["kernel"].shape
      (1, 1, 2, 4)
    """
    check_pre_svd(pre_svd)
    if pre_svd == "none":
        conv = nn.Conv(features, kernel_size, strides, padding=padding, use_bias=False,
                       dtype=dtype, param_dtype=param_dtype, name=name)
        return conv(x)
    if pre_svd == "sn":
        conv = SpectralNormConv(features, kernel_size, strides, padding=padding, dtype=dtype,
                                param_dtype=param_dtype, name=name)
        return conv(x, update_stats=update_stats)
    if _checks.check_pair("pre_svd_conv", "strides", strides) != (1, 1):
        raise ValueError(
            f"pre_svd='ow' (skew orthogonal convolution) supports stride 1 only; got {strides=}"
        )
    conv = SkewOrthogonalConv(features, kernel_size=kernel_size, dtype=dtype,
                              param_dtype=param_dtype, name=name)
    return conv(x, update_stats=update_stats)


def upper_triangle(m: Array) -> Array:
    """Upper triangle with diagonal of (..., d, d) matrices, row-major: (..., d(d+1)/2).

    Args:
      m: (..., d, d).

    Returns:
      (..., d*(d+1)/2).

    Raises:
      ValueError: if ``m`` is not a batch of square matrices.

    Example:
      >>> import jax.numpy as jnp
      >>> upper_triangle(jnp.arange(4.0).reshape(2, 2)).tolist()
      [0.0, 1.0, 3.0]
    """
    shape = jnp.shape(m)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"upper_triangle: m must be (..., d, d); got m.shape={shape}")
    rows, cols = jnp.triu_indices(m.shape[-1])
    return m[..., rows, cols]


def covariance_sqrt_features(
    x: Array, *, method: str = "eigh", method_kwargs: dict[str, Any] | None = None
) -> Array:
    """GCP representation of NHWC features: triu(sqrtm(cov)) per image (Eqs. 2, 44).

    The (d, H*W) feature of each image gives P = X J X^T (Eq. 2, no eps: rank-deficient
    when H*W <= d, the meta-layer clamps eigenvalues), Q = P^{1/2} (Eq. 44), and the upper
    triangle of Q with its diagonal. Computed in float32 (float64 for float64 input) and
    returned in x's dtype. A NaN/inf in an image makes that image's output NaN.

    Args:
      x: features (B, H, W, d), real floating, H*W >= 2.
      method: meta-layer method (``meta_layer.METHODS``).
      method_kwargs: options for the method.

    Returns:
      (B, d*(d+1)/2) array in x's dtype.

    Raises:
      TypeError: for a non-floating ``x``.
      ValueError: if ``x`` is not 4-D, has no channel, or fewer than 2 positions per image
        (the covariance of one sample is 0); for an unknown method or option.

    Example:
      >>> import jax
      >>> x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
      >>> covariance_sqrt_features(x).shape
      (2, 10)
    """
    where = "covariance_sqrt_features"
    x = _checks.check_input(where, x, ndim=4, layout="(B, H, W, d)")
    _checks.check_method(where, method, method_kwargs)
    batch, height, width, dim = x.shape
    if height * width < 2:
        raise ValueError(f"{where}: a covariance needs at least 2 positions (H*W) per image; "
                         f"got x.shape={x.shape}")
    feats = x.astype(_checks.compute_dtype(x.dtype))
    feats = jnp.swapaxes(feats.reshape(batch, height * width, dim), -1, -2)  # (B, d, HW)
    root = meta_layer.sqrtm(covariance(feats), method=method, **(method_kwargs or {}))
    return upper_triangle(root).astype(x.dtype)


def check_gcp_batch(where: str, x: Array, *, training: bool) -> None:
    """At least 2 positions (H*W) per image, and in training at least one image (the
    BatchNorm statistics of an empty batch are 0/0)."""
    if x.shape[1] * x.shape[2] < 2:
        raise ValueError(f"{where}: a covariance needs at least 2 positions (H*W) per "
                         f"image; got x.shape={x.shape}")
    if training and x.shape[0] < 1:
        raise ValueError(f"{where}: batch statistics need at least 1 sample per channel; "
                         f"got x.shape={x.shape} (0 samples)")


def _check_covariance_pooling(where: str, *, dim: Any, method: Any, method_kwargs: Any,
                             pre_svd: Any, momentum: Any, epsilon: Any, dtype: Any,
                             param_dtype: Any) -> None:
    """Static arguments of the GCP head (Linen and NNX)."""
    _checks.check_int(where, "dim", dim, 1)
    _checks.check_method(where, method, method_kwargs)
    check_pre_svd(pre_svd, where)
    _checks.check_real(where, "momentum", momentum, low=0.0, high=1.0)
    _checks.check_real(where, "epsilon", epsilon, low=0.0)
    _checks.check_dtype(where, "dtype", dtype)
    _checks.check_dtype(where, "param_dtype", param_dtype, optional=False)


class CovariancePooling(nn.Module):
    """GCP head (Appendix B.2, docs/applications.md): reduce conv, BN, ReLU, sqrt-cov.

    x (B, H, W, C) -> 1x1 conv to ``dim`` channels without bias (the Pre-SVD layer, param
    ``pre_svd_conv/kernel``) -> BatchNorm (``bn``) -> ReLU (this feature, whose covariance
    the meta-layer decomposes, is sown to ``intermediates`` as ``"pre_svd_features"``)
    -> per-image covariance of the (dim, H*W) feature -> matrix square root by ``method``
    -> upper triangle with the diagonal: (B, dim*(dim+1)/2), 32,896 values for dim 256
    (:func:`covariance_sqrt_features`).

    Call convention: like ``flax.linen.BatchNorm``, ``use_running_average`` (attribute or
    call argument). ``use_running_average=False`` is a training call: batch statistics in
    the BN (running ones updated), and for ``pre_svd`` "sn"/"ow" the power-iteration
    vectors updated (``update_stats=True``); pass ``mutable=["batch_stats"]``.

    dtypes: the conv and the BN compute in ``dtype`` (None: float32, float64 for float64
    input); the covariance and its square root in float32 (float64); the result is in
    ``dtype`` (None: the input's dtype), so bfloat16 in gives bfloat16 out.

    Running statistics: a training batch whose BatchNorm statistics are not finite leaves
    the BN's running ``mean`` and ``var`` as they were and increments the int32 counter
    ``batch_stats`` entry ``"nonfinite_batches"`` of this module
    (``svdcond_jax.nn.whitening.finite_or_previous``), so one NaN batch cannot poison
    evaluation.

    Attributes:
      dim: channels of the reduction conv (256 in the paper), >= 1.
      method: meta-layer method for the square root (``meta_layer.METHODS``).
      method_kwargs: options for the method.
      pre_svd: weight treatment of the reduction conv: "none" | "sn" | "ow".
      momentum: BatchNorm momentum, in [0, 1].
      epsilon: BatchNorm epsilon, >= 0.
      axis_name: BatchNorm axis name for pmap/shard_map.
      dtype: computation dtype of conv and BN and dtype of the result (None: see above).
      param_dtype: dtype of the conv kernel and the BN scale/bias.
      use_running_average: see above (may be given at call time).

    Raises:
      TypeError / ValueError: at construction for a bad attribute (naming it); at call
        time for a non-floating or non-NHWC ``x``, fewer than 2 positions per image, or
        an empty training batch.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> head = CovariancePooling(dim=8)
      >>> x = jnp.ones((2, 4, 4, 16))
      >>> variables = head.init(jax.random.key(0), x, use_running_average=True)
      >>> head.apply(variables, x, use_running_average=True).shape
      (2, 36)
    """

    dim: int = 256
    method: str = "eigh"
    method_kwargs: dict[str, Any] | None = None
    pre_svd: str = "none"
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_running_average: bool | None = None

    def __post_init__(self) -> None:
        _check_covariance_pooling(
            type(self).__name__, dim=self.dim, method=self.method,
            method_kwargs=self.method_kwargs, pre_svd=self.pre_svd, momentum=self.momentum,
            epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Pool NHWC features.

        Args:
          x: (B, H, W, C), real floating, H*W >= 2.
          use_running_average: evaluation (True) or training (False) call; overrides the
            attribute.

        Returns:
          (B, dim*(dim+1)/2) in ``dtype`` (None: ``x.dtype``).
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        where = type(self).__name__
        x = _checks.check_input(where, x, ndim=4, layout="(B, H, W, C)")
        check_gcp_batch(where, x, training=not use_running_average)
        cdtype = self.dtype or _checks.compute_dtype(x.dtype)
        y = pre_svd_conv(x, pre_svd=self.pre_svd, features=self.dim, kernel_size=(1, 1),
                         update_stats=not use_running_average, name="pre_svd_conv",
                         dtype=cdtype, param_dtype=self.param_dtype)
        count = self.variable("batch_stats", NONFINITE_BATCHES,
                              lambda: jnp.zeros((), jnp.int32))
        bn = nn.BatchNorm(use_running_average=use_running_average, momentum=self.momentum,
                          epsilon=self.epsilon, axis_name=self.axis_name, dtype=cdtype,
                          param_dtype=self.param_dtype, name="bn")
        guard = not use_running_average and not self.is_initializing()
        if guard:  # the BN's running statistics before its update (arrays, not a view)
            previous = {k: bn.get_variable("batch_stats", k) for k in ("mean", "var")}
        y = nn.relu(bn(y))
        if guard:
            kept, count.value = finite_or_previous(
                {k: bn.get_variable("batch_stats", k) for k in previous}, previous,
                count.value)
            for k, v in kept.items():
                bn.put_variable("batch_stats", k, v)
        # What the meta-layer decomposes: the monitor measures exactly this covariance.
        self.sow("intermediates", "pre_svd_features", y)
        out = covariance_sqrt_features(y, method=self.method, method_kwargs=self.method_kwargs)
        return out.astype(self.dtype or x.dtype)
