"""svdcond_jax: covariance conditioning of the SVD meta-layer by orthogonality.

JAX/Flax/optax implementation of Song et al., "Improving Covariance Conditioning of the
SVD Meta-layer by Orthogonality", ECCV 2022. This module only re-exports the public API;
training lives in ``svdcond_jax.training`` and is not imported here.
"""

# Flax NNX versions of the layers: svdcond_jax.nnx.DecorrelatedBatchNorm etc.
from svdcond_jax import nnx

# The meta-layer: covariance (Eq. 2), matrix (inverse) square roots (Eqs. 3-8), kappa (Eq. 1).
from svdcond_jax.meta_layer import (
    METHODS,
    condition_number,
    condition_number_f64,
    covariance,
    eigvalsh_f64,
    inv_sqrtm,
    sqrtm,
    sqrtm_and_inv_sqrtm,
)

# Flax modules and models.
from svdcond_jax.models import (
    CifarResNet18,
    CifarResNet50,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    TinyResNet,
    pre_svd_eps,
    pre_svd_features,
    pre_svd_pattern,
)
from svdcond_jax.nn import (
    CovariancePooling,
    DecorrelatedBatchNorm,
    OrthogonalDense,
    SkewOrthogonalConv,
    SpectralNormConv,
)

# The optimizer: SGD with NOG and OLR on the Pre-SVD layer.
from svdcond_jax.optimizers import find_olr_eta, pre_svd_labels, pre_svd_mask, pre_svd_sgd

# Orthogonality: polar factor (NOG, Eqs. 14-17), orthogonality loss (Eq. 12), expm (Eq. 13).
from svdcond_jax.orthogonal import (
    as_matrix,
    orthogonality_loss,
    polar_factor,
    skew_symmetric_expm,
)

# Optax transforms: Nearest Orthogonal Gradient and Optimal Learning Rate (Eqs. 14-21).
from svdcond_jax.transforms import (
    OptimalLearningRateState,
    nearest_orthogonal_gradient,
    optimal_eta,
    optimal_learning_rate,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CifarResNet18",
    "CifarResNet50",
    "CovariancePooling",
    "DecorrelatedBatchNorm",
    "OptimalLearningRateState",
    "OrthogonalDense",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "SkewOrthogonalConv",
    "SpectralNormConv",
    "TinyResNet",
    "as_matrix",
    "condition_number",
    "condition_number_f64",
    "covariance",
    "eigvalsh_f64",
    "find_olr_eta",
    "inv_sqrtm",
    "nearest_orthogonal_gradient",
    "nnx",
    "optimal_eta",
    "optimal_learning_rate",
    "orthogonality_loss",
    "polar_factor",
    "pre_svd_eps",
    "pre_svd_features",
    "pre_svd_labels",
    "pre_svd_mask",
    "pre_svd_pattern",
    "pre_svd_sgd",
    "skew_symmetric_expm",
    "sqrtm",
    "sqrtm_and_inv_sqrtm",
]
