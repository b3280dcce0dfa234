"""Flax NNX layers: decorrelated BN, covariance pooling, orthogonal / spectral-norm layers.

The NNX counterparts of ``svdcond_jax.nn`` (as ``flax.nnx`` is of ``flax.linen``): the same
pure math (``svdcond_jax.nn.whitening``, ``pooling``, ``orthogonal_layers``), with NNX
conventions: constructors take ``in_features``/``num_features`` and ``rngs``; running
statistics and power-iteration vectors are ``nnx.BatchStat``; ``model.train()`` /
``model.eval()`` switch ``use_running_average`` (for the power-iteration layers it is
``not update_stats``, as in ``nnx.SpectralNorm``).
"""

from svdcond_jax.nnx.orthogonal_layers import OrthogonalDense as OrthogonalDense
from svdcond_jax.nnx.orthogonal_layers import SkewOrthogonalConv as SkewOrthogonalConv
from svdcond_jax.nnx.orthogonal_layers import SpectralNormConv as SpectralNormConv
from svdcond_jax.nnx.pooling import CovariancePooling as CovariancePooling
from svdcond_jax.nnx.pooling import apply_pre_svd_conv as apply_pre_svd_conv
from svdcond_jax.nnx.pooling import pre_svd_conv as pre_svd_conv
from svdcond_jax.nnx.whitening import DecorrelatedBatchNorm as DecorrelatedBatchNorm

__all__ = [
    "CovariancePooling",
    "DecorrelatedBatchNorm",
    "OrthogonalDense",
    "SkewOrthogonalConv",
    "SpectralNormConv",
    "apply_pre_svd_conv",
    "pre_svd_conv",
]
