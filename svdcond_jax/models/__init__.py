"""ResNet models with a decorrelated-BN stem and/or a covariance-pooling head."""

from svdcond_jax.models.resnet import BottleneckResNetBlock as BottleneckResNetBlock
from svdcond_jax.models.resnet import CifarResNet18 as CifarResNet18
from svdcond_jax.models.resnet import CifarResNet50 as CifarResNet50
from svdcond_jax.models.resnet import ResNet as ResNet
from svdcond_jax.models.resnet import ResNet18 as ResNet18
from svdcond_jax.models.resnet import ResNet34 as ResNet34
from svdcond_jax.models.resnet import ResNet50 as ResNet50
from svdcond_jax.models.resnet import ResNetBlock as ResNetBlock
from svdcond_jax.models.resnet import TinyResNet as TinyResNet
from svdcond_jax.models.resnet import pre_svd_eps as pre_svd_eps
from svdcond_jax.models.resnet import pre_svd_features as pre_svd_features
from svdcond_jax.models.resnet import pre_svd_pattern as pre_svd_pattern
