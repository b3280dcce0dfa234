"""svdcond_jax: covariance conditioning of the SVD meta-layer by orthogonality.

JAX/Flax/optax implementation of Song et al., "Improving Covariance Conditioning of the
SVD Meta-layer by Orthogonality", ECCV 2022. This module only re-exports the public API.
"""

__version__ = "0.1.0"

# --- meta-layer (issue: foundation) -------------------------------------------------
# (meta-layer exports)
from svdcond_jax.meta_layer import METHODS as METHODS  # noqa: E402
from svdcond_jax.meta_layer import condition_number as condition_number  # noqa: E402
from svdcond_jax.meta_layer import condition_number_f64 as condition_number_f64  # noqa: E402
from svdcond_jax.meta_layer import covariance as covariance  # noqa: E402
from svdcond_jax.meta_layer import eigvalsh_f64 as eigvalsh_f64  # noqa: E402
from svdcond_jax.meta_layer import inv_sqrtm as inv_sqrtm  # noqa: E402
from svdcond_jax.meta_layer import sqrtm as sqrtm  # noqa: E402
from svdcond_jax.meta_layer import sqrtm_and_inv_sqrtm as sqrtm_and_inv_sqrtm  # noqa: E402

# --- NOG / OLR / weight treatments --------------------------------------------------
# (orthogonality exports)
from svdcond_jax.nn.orthogonal_layers import OrthogonalDense as OrthogonalDense  # noqa: E402
from svdcond_jax.nn.orthogonal_layers import SkewOrthogonalConv as SkewOrthogonalConv  # noqa: E402
from svdcond_jax.nn.orthogonal_layers import SpectralNormConv as SpectralNormConv  # noqa: E402
from svdcond_jax.optimizers import find_olr_eta as find_olr_eta  # noqa: E402
from svdcond_jax.optimizers import pre_svd_mask as pre_svd_mask  # noqa: E402
from svdcond_jax.optimizers import pre_svd_sgd as pre_svd_sgd  # noqa: E402
from svdcond_jax.orthogonal import as_matrix as as_matrix  # noqa: E402
from svdcond_jax.orthogonal import orthogonality_loss as orthogonality_loss  # noqa: E402
from svdcond_jax.orthogonal import polar_factor as polar_factor  # noqa: E402
from svdcond_jax.orthogonal import skew_symmetric_expm as skew_symmetric_expm  # noqa: E402
from svdcond_jax.transforms import OptimalLearningRateState as OptimalLearningRateState  # noqa: E402
from svdcond_jax.transforms import nearest_orthogonal_gradient as nearest_orthogonal_gradient  # noqa: E402
from svdcond_jax.transforms import optimal_eta as optimal_eta  # noqa: E402
from svdcond_jax.transforms import optimal_learning_rate as optimal_learning_rate  # noqa: E402

# --- Flax modules and models --------------------------------------------------------
# (model exports)
# isort: split
from svdcond_jax.models import CifarResNet18 as CifarResNet18  # noqa: E402
from svdcond_jax.models import CifarResNet50 as CifarResNet50  # noqa: E402
from svdcond_jax.models import ResNet as ResNet  # noqa: E402
from svdcond_jax.models import ResNet18 as ResNet18  # noqa: E402
from svdcond_jax.models import ResNet34 as ResNet34  # noqa: E402
from svdcond_jax.models import ResNet50 as ResNet50  # noqa: E402
from svdcond_jax.models import TinyResNet as TinyResNet  # noqa: E402
from svdcond_jax.models import pre_svd_eps as pre_svd_eps  # noqa: E402
from svdcond_jax.models import pre_svd_features as pre_svd_features  # noqa: E402
from svdcond_jax.models import pre_svd_pattern as pre_svd_pattern  # noqa: E402
from svdcond_jax.nn import CovariancePooling as CovariancePooling  # noqa: E402
from svdcond_jax.nn import DecorrelatedBatchNorm as DecorrelatedBatchNorm  # noqa: E402
