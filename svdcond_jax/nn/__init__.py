"""Flax modules: decorrelated BN, covariance pooling, orthogonal / spectral-norm layers."""

from svdcond_jax.nn.orthogonal_layers import OrthogonalDense as OrthogonalDense
from svdcond_jax.nn.orthogonal_layers import SkewOrthogonalConv as SkewOrthogonalConv
from svdcond_jax.nn.orthogonal_layers import SpectralNormConv as SpectralNormConv
from svdcond_jax.nn.pooling import CovariancePooling as CovariancePooling
from svdcond_jax.nn.pooling import covariance_sqrt_features as covariance_sqrt_features
from svdcond_jax.nn.pooling import pre_svd_conv as pre_svd_conv
from svdcond_jax.nn.pooling import upper_triangle as upper_triangle
from svdcond_jax.nn.whitening import DecorrelatedBatchNorm as DecorrelatedBatchNorm
