"""Global covariance pooling (GCP) head: matrix square root of per-image covariances.

Implements the GCP head of the paper's second application (Appendix B.2, Eq. 44;
docs/applications.md) and the factory for the Pre-SVD convolution shared with the
ResNets (plain conv, spectral norm "sn", or orthogonal weight "ow" = skew orthogonal
convolution; Sec. 4.2, docs/weight_treatments.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdcond_jax import meta_layer
from svdcond_jax.nn.orthogonal_layers import SkewOrthogonalConv, SpectralNormConv

Array = jax.Array

PRE_SVD_TREATMENTS = ("none", "sn", "ow")


def check_pre_svd(pre_svd: str) -> None:
    """Raise ValueError unless ``pre_svd`` is one of :data:`PRE_SVD_TREATMENTS`."""
    if pre_svd not in PRE_SVD_TREATMENTS:
        raise ValueError(f"pre_svd={pre_svd!r}; valid: {PRE_SVD_TREATMENTS}")


def pre_svd_conv(
    x: Array,
    *,
    pre_svd: str,
    features: int,
    kernel_size: tuple[int, int],
    train: bool,
    name: str,
    strides: int = 1,
    padding: Any = "SAME",
    dtype: Any = jnp.float32,
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
      train: training mode (power iterations / SOC series length).
      name: submodule name, fixed so that the parameter path is stable.
      strides: stride (must be 1 for "ow").
      padding: padding of the plain and the spectral-norm conv (SOC pads "SAME").
      dtype: computation dtype of the plain conv.

    Returns:
      The conv output, NHWC with ``features`` channels.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return pre_svd_conv(x, pre_svd="none", features=4, kernel_size=(1, 1),
      ...                             train=True, name="pre_svd_conv")
      >>> v = Net().init(jax.random.key(0), jnp.ones((1, 3, 3, 2)))
      >>> v["params"]["pre_svd_conv"]["kernel"].shape
      (1, 1, 2, 4)
    """
    check_pre_svd(pre_svd)
    if pre_svd == "none":
        conv = nn.Conv(features, kernel_size, strides, padding=padding, use_bias=False,
                       dtype=dtype, name=name)
        return conv(x)
    if pre_svd == "sn":
        conv = SpectralNormConv(features, kernel_size, strides, padding=padding, name=name)
        return conv(x, train=train)
    if strides not in (1, (1, 1)):
        raise ValueError(
            f"pre_svd='ow' (skew orthogonal convolution) supports stride 1 only; got {strides=}"
        )
    conv = SkewOrthogonalConv(features, kernel_size=kernel_size, name=name)
    return conv(x, train=train)


def upper_triangle(m: Array) -> Array:
    """Upper triangle with diagonal of (..., d, d) matrices, row-major: (..., d(d+1)/2).

    Example:
      >>> import jax.numpy as jnp
      >>> upper_triangle(jnp.arange(4.0).reshape(2, 2)).tolist()
      [0.0, 1.0, 3.0]
    """
    rows, cols = jnp.triu_indices(m.shape[-1])
    return m[..., rows, cols]


def covariance_sqrt_features(
    x: Array, *, method: str = "eigh", method_kwargs: dict[str, Any] | None = None
) -> Array:
    """GCP representation of NHWC features: triu(sqrtm(cov)) per image (Eqs. 2, 44).

    The (d, H*W) feature of each image gives P = X J X^T (Eq. 2, no eps: rank-deficient
    when H*W < d, the meta-layer clamps eigenvalues), Q = P^{1/2} (Eq. 44), and the upper
    triangle of Q with its diagonal. Computed in float32 (float64 for float64 input).

    Args:
      x: features (B, H, W, d).
      method: meta-layer method (``meta_layer.METHODS``).
      method_kwargs: options for the method.

    Returns:
      (B, d*(d+1)/2) array.

    Example:
      >>> import jax
      >>> x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
      >>> covariance_sqrt_features(x).shape
      (2, 10)
    """
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (B, H, W, d); got {x.shape=}")
    batch, height, width, dim = x.shape
    feats = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    feats = jnp.swapaxes(feats.reshape(batch, height * width, dim), -1, -2)  # (B, d, HW)
    cov = meta_layer.covariance(feats, layout="features_first")
    root = meta_layer.sqrtm(cov, method=method, **(method_kwargs or {}))
    return upper_triangle(root)


class CovariancePooling(nn.Module):
    """GCP head (Appendix B.2, docs/applications.md): reduce conv, BN, ReLU, sqrt-cov.

    x (B, H, W, C) -> 1x1 conv to ``dim`` channels without bias (the Pre-SVD layer, param
    ``pre_svd_conv/kernel``) -> BatchNorm (``bn``) -> ReLU (this feature, whose covariance
    the meta-layer decomposes, is sown to ``intermediates`` as ``"pre_svd_features"``)
    -> per-image covariance of the (dim, H*W) feature -> matrix square root by ``method``
    -> upper triangle with the diagonal: (B, dim*(dim+1)/2), 32,896 values for dim 256.

    Attributes:
      dim: channels of the reduction conv (256 in the paper).
      method: meta-layer method for the square root (``meta_layer.METHODS``).
      method_kwargs: options for the method.
      pre_svd: weight treatment of the reduction conv: "none" | "sn" | "ow".
      momentum: BatchNorm momentum.
      epsilon: BatchNorm epsilon.
      axis_name: BatchNorm axis name for pmap/shard_map.
      dtype: dtype of the conv and the BatchNorm (the covariance is float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> head = CovariancePooling(dim=8)
      >>> x = jnp.ones((2, 4, 4, 16))
      >>> variables = head.init(jax.random.key(0), x, train=False)
      >>> head.apply(variables, x, train=False).shape
      (2, 36)
    """

    dim: int = 256
    method: str = "eigh"
    method_kwargs: dict[str, Any] | None = None
    pre_svd: str = "none"
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """Pool NHWC features ``x`` into (B, dim*(dim+1)/2)."""
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC (B, H, W, C); got {x.shape=}")
        y = pre_svd_conv(x, pre_svd=self.pre_svd, features=self.dim, kernel_size=(1, 1),
                         train=train, name="pre_svd_conv", dtype=self.dtype)
        y = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                         epsilon=self.epsilon, axis_name=self.axis_name, dtype=self.dtype,
                         name="bn")(y)
        y = nn.relu(y)
        # What the meta-layer decomposes: the monitor measures exactly this covariance.
        self.sow("intermediates", "pre_svd_features", y)
        return covariance_sqrt_features(y, method=self.method, method_kwargs=self.method_kwargs)
