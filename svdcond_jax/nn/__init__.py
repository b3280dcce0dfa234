"""Flax Linen layers: decorrelated BN, covariance pooling, orthogonal / spectral-norm layers.

Each module (``whitening``, ``pooling``, ``orthogonal_layers``) holds the pure math as
functions and the Linen layer as a thin wrapper over them; ``svdcond_jax.nnx`` wraps the same
functions as Flax NNX layers.
"""

from svdcond_jax.nn.orthogonal_layers import OrthogonalDense as OrthogonalDense
from svdcond_jax.nn.orthogonal_layers import SkewOrthogonalConv as SkewOrthogonalConv
from svdcond_jax.nn.orthogonal_layers import SpectralNormConv as SpectralNormConv
from svdcond_jax.nn.orthogonal_layers import power_iteration as power_iteration
from svdcond_jax.nn.orthogonal_layers import soc_kernel as soc_kernel
from svdcond_jax.nn.orthogonal_layers import soc_series as soc_series
from svdcond_jax.nn.orthogonal_layers import spectral_normalize as spectral_normalize
from svdcond_jax.nn.pooling import CovariancePooling as CovariancePooling
from svdcond_jax.nn.pooling import covariance_sqrt_features as covariance_sqrt_features
from svdcond_jax.nn.pooling import pre_svd_conv as pre_svd_conv
from svdcond_jax.nn.pooling import upper_triangle as upper_triangle
from svdcond_jax.nn.whitening import DecorrelatedBatchNorm as DecorrelatedBatchNorm
from svdcond_jax.nn.whitening import ema_update as ema_update
from svdcond_jax.nn.whitening import finite_or_previous as finite_or_previous
from svdcond_jax.nn.whitening import zca_statistics as zca_statistics
from svdcond_jax.nn.whitening import zca_whiten as zca_whiten
