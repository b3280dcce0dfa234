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

# Optimizers: NOG and OLR on the Pre-SVD layer next to SGD or any optax optimizer, and on
# every matrix layer (the paper's conventions or Muon's).
from svdcond_jax.optimizers import (
    check_olr_placement,
    find_olr_eta,
    nog_labels,
    nog_mask,
    nog_optimizer,
    pre_svd_labels,
    pre_svd_mask,
    pre_svd_optimizer,
    pre_svd_sgd,
)

# Orthogonality: polar factor (NOG, Eqs. 14-17), orthogonality loss (Eq. 12), expm (Eq. 13).
from svdcond_jax.orthogonal import (
    as_matrix,
    orthogonality_loss,
    polar_factor,
    skew_symmetric_expm,
)

# Optax transforms: Nearest Orthogonal Gradient and Optimal Learning Rate (Eqs. 14-21).
from svdcond_jax.transforms import (
    EmaMomentumState,
    OptimalLearningRateState,
    ema_momentum,
    nearest_orthogonal_gradient,
    optimal_eta,
    optimal_learning_rate,
    scale_by_shape,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CifarResNet18",
    "CifarResNet50",
    "CovariancePooling",
    "DecorrelatedBatchNorm",
    "EmaMomentumState",
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
    "check_olr_placement",
    "condition_number",
    "condition_number_f64",
    "covariance",
    "eigvalsh_f64",
    "ema_momentum",
    "find_olr_eta",
    "inv_sqrtm",
    "nearest_orthogonal_gradient",
    "nnx",
    "nog_labels",
    "nog_mask",
    "nog_optimizer",
    "optimal_eta",
    "optimal_learning_rate",
    "orthogonality_loss",
    "polar_factor",
    "pre_svd_eps",
    "pre_svd_features",
    "pre_svd_labels",
    "pre_svd_mask",
    "pre_svd_optimizer",
    "pre_svd_pattern",
    "pre_svd_sgd",
    "scale_by_shape",
    "skew_symmetric_expm",
    "sqrtm",
    "sqrtm_and_inv_sqrtm",
]
