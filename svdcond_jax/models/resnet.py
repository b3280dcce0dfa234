"""ResNets with an SVD meta-layer: decorrelated-BN stem and/or covariance-pooling head.

In the style of flax ``examples/imagenet/models.py``: one :class:`ResNet` module with
``stage_sizes`` and ``block_cls``, the convolution and normalisation injected into the
blocks, and the variants as ``functools.partial``.

Module names (stable; parameter paths are '/'-joined):

* ``stem_conv``: first convolution (ImageNet: 7x7/2, padding 3, followed by a 3x3/2 max
  pool; CIFAR: 3x3/1, no max pool, Fig. 6).
* ``stem_norm``: ``nn.BatchNorm`` (``stem_norm="bn"``) or ``DecorrelatedBatchNorm``
  (``stem_norm="dbn"``, Appendix B.1).
* ``stage{i}_block{j}``: residual blocks (i from 1, j from 0), each with ``Conv_k`` /
  ``BatchNorm_k`` and ``conv_proj`` / ``norm_proj`` on projection shortcuts.
* ``head``: ``CovariancePooling`` for ``head="gcp"`` (Appendix B.2), with
  ``head/pre_svd_conv`` and ``head/bn``; no module for ``head="gap"``.
* ``fc``: the classifier.

The Pre-SVD layer (the layer right before the SVD meta-layer):

* ``stem_norm="dbn", head="gap"``: the stem conv, kernel ``stem_conv/kernel``.
* ``stem_norm="bn", head="gcp"``: the head's 1x1 conv, kernel ``head/pre_svd_conv/kernel``.
* ``stem_norm="dbn", head="gcp"``: rejected with ValueError (two meta-layers, no unique
  Pre-SVD layer; the paper never combines them).
* ``stem_norm="bn", head="gap"``: no SVD layer; ``pre_svd`` must be "none".

``pre_svd`` ("none" | "sn" | "ow") replaces that conv by ``nn.Conv``,
``SpectralNormConv`` or ``SkewOrthogonalConv``; its trainable param is always named
``kernel``. The features whose covariance the meta-layer decomposes are sown to
``intermediates`` as ``pre_svd_features``: the stem conv output (top level) for DBN, the
head's BN + ReLU output (under ``head``) for GCP; :func:`pre_svd_features` finds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdcond_jax.nn.pointwise_conv import conv_general_dilated
from svdcond_jax.nn.pooling import CovariancePooling, check_pre_svd, pre_svd_conv
from svdcond_jax.nn.whitening import DecorrelatedBatchNorm

Array = jax.Array
ModuleDef = Any

STEMS = ("imagenet", "cifar")
STEM_NORMS = ("bn", "dbn")
HEADS = ("gap", "gcp")


class ResNetBlock(nn.Module):
    """Basic residual block (two 3x3 convs), as torchvision's BasicBlock."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Apply the block to NHWC ``x``."""
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    """Bottleneck block (1x1, 3x3 with the stride, 1x1 x4), as torchvision's v1.5."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Apply the block to NHWC ``x``."""
        residual = x
        y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides,
                                 name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


def check_config(model: ResNet) -> None:
    """Raise ValueError for an invalid combination of ResNet options (at trace time)."""
    for field, value, valid in (("stem", model.stem, STEMS),
                                ("stem_norm", model.stem_norm, STEM_NORMS),
                                ("head", model.head, HEADS)):
        if value not in valid:
            raise ValueError(f"{field}={value!r}; valid: {valid}")
    check_pre_svd(model.pre_svd)
    if model.stem_norm == "dbn" and model.head == "gcp":
        raise ValueError("stem_norm='dbn' with head='gcp' has two SVD meta-layers and no "
                         "unique Pre-SVD layer; use one of them")
    if model.stem_norm == "bn" and model.head == "gap" and model.pre_svd != "none":
        raise ValueError(f"pre_svd={model.pre_svd!r} needs an SVD meta-layer "
                         "(stem_norm='dbn' or head='gcp')")
    if model.stem == "imagenet" and model.stem_norm == "dbn" and model.pre_svd == "ow":
        raise ValueError("pre_svd='ow' (skew orthogonal conv) is stride-1 only, but the "
                         "ImageNet stem conv is 7x7 stride 2; use stem='cifar'")


class ResNet(nn.Module):
    """ResNet with optional decorrelated-BN stem and covariance-pooling head.

    With the defaults, ``ResNet18(num_classes=1000)`` etc. are the torchvision ImageNet
    networks (11,689,512 params for ResNet-18, 25,557,032 for ResNet-50). See the module
    docstring for the names and the Pre-SVD layer of each configuration.

    Attributes:
      num_classes: classifier outputs.
      stage_sizes: blocks per stage.
      block_cls: ``ResNetBlock`` or ``BottleneckResNetBlock``.
      num_filters: channels of the stem and the first stage.
      stem: "imagenet" (7x7/2 conv + max pool) or "cifar" (3x3/1 conv, Fig. 6).
      stem_norm: "bn" or "dbn" (decorrelated BN, Eq. 43).
      head: "gap" (global average pool) or "gcp" (covariance pooling, Eq. 44).
      pre_svd: weight treatment of the Pre-SVD conv: "none" | "sn" | "ow".
      meta_method: meta-layer method of the DBN / GCP (``meta_layer.METHODS``).
      meta_kwargs: options of the meta-layer method.
      dbn_eps: eps*I added to the DBN covariance.
      dbn_groups: channel groups of the DBN.
      gcp_dim: channels of the GCP reduction conv.
      axis_name: BatchNorm/DBN axis name under pmap/shard_map (None under jit).
      dtype: computation dtype of convs and norms (statistics stay float32).
      act: activation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = TinyResNet(num_classes=10, stem_norm="dbn")
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
      >>> logits.shape, pre_svd_pattern(model)
      ((2, 10), '^stem_conv/kernel$')
    """

    num_classes: int
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_filters: int = 64
    stem: str = "imagenet"
    stem_norm: str = "bn"
    head: str = "gap"
    pre_svd: str = "none"
    meta_method: str = "eigh"
    meta_kwargs: dict[str, Any] | None = None
    dbn_eps: float = 1e-2
    dbn_groups: int = 1
    gcp_dim: int = 256
    axis_name: str | None = None
    dtype: Any = jnp.float32
    act: Callable[[Array], Array] = nn.relu

    def _norm(self, train: bool) -> ModuleDef:
        return partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name)

    def _stem(self, x: Array, train: bool) -> Array:
        """Stem conv (the Pre-SVD layer under DBN) + stem norm + act (+ max pool)."""
        imagenet = self.stem == "imagenet"
        kernel, strides = ((7, 7), 2) if imagenet else ((3, 3), 1)
        padding = [(3, 3), (3, 3)] if imagenet else [(1, 1), (1, 1)]
        treatment = self.pre_svd if self.stem_norm == "dbn" else "none"
        x = pre_svd_conv(x, pre_svd=treatment, features=self.num_filters, kernel_size=kernel,
                         strides=strides, padding=padding, train=train, name="stem_conv",
                         dtype=self.dtype)
        if self.stem_norm == "dbn":
            self.sow("intermediates", "pre_svd_features", x)
            x = DecorrelatedBatchNorm(
                use_running_average=not train, epsilon=self.dbn_eps, groups=self.dbn_groups,
                method=self.meta_method, method_kwargs=self.meta_kwargs,
                axis_name=self.axis_name, dtype=self.dtype, name="stem_norm")(x)
        else:
            x = self._norm(train)(name="stem_norm")(x)
        x = self.act(x)
        if imagenet:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x

    def _head(self, x: Array, train: bool) -> Array:
        if self.head == "gap":
            return jnp.mean(x, axis=(1, 2))
        return CovariancePooling(dim=self.gcp_dim, method=self.meta_method,
                                 method_kwargs=self.meta_kwargs, pre_svd=self.pre_svd,
                                 axis_name=self.axis_name, dtype=self.dtype, name="head")(
            x, train=train)

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        """Logits (B, num_classes) of NHWC images ``x``."""
        check_config(self)
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC images (B, H, W, C); got {x.shape=}")
        # 1x1 convs as matrix products: XLA:CPU's 1x1 weight gradient is 5x slower as a
        # convolution (svdcond_jax/nn/pointwise_conv.py); same parameters and outputs.
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype,
                       conv_general_dilated=conv_general_dilated)
        x = self._stem(x, train)
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv,
                                   norm=self._norm(train), act=self.act,
                                   name=f"stage{i + 1}_block{j}")(x)
        x = self._head(x, train)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return jnp.asarray(x, self.dtype)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)
CifarResNet18 = partial(ResNet18, stem="cifar")
CifarResNet50 = partial(ResNet50, stem="cifar")
TinyResNet = partial(ResNet, stage_sizes=(1, 1), block_cls=ResNetBlock, num_filters=8,
                     stem="cifar")


def pre_svd_pattern(model: ResNet) -> str:
    """Regex matching exactly the Pre-SVD trainable kernel's '/'-joined param path.

    For NOG / OLR / orthogonal treatments (``pre_svd_sgd(..., pre_svd=pattern)``) and the
    conditioning monitor.

    Args:
      model: a ResNet (any variant).

    Returns:
      ``r"^stem_conv/kernel$"`` for the DBN stem, ``r"^head/pre_svd_conv/kernel$"`` for GCP.

    Raises:
      ValueError: if the configuration is invalid or has no SVD meta-layer.

    Example:
      >>> pre_svd_pattern(CifarResNet50(num_classes=100, stem_norm="dbn"))
      '^stem_conv/kernel$'
    """
    check_config(model)
    if model.stem_norm == "dbn":
        return r"^stem_conv/kernel$"
    if model.head == "gcp":
        return r"^head/pre_svd_conv/kernel$"
    raise ValueError("model has no SVD meta-layer (stem_norm='bn', head='gap'), so no "
                     "Pre-SVD layer")


def pre_svd_eps(model: ResNet) -> float:
    """The eps*I the meta-layer adds to the Pre-SVD covariance (dbn_eps for DBN, 0 for GCP).

    Example:
      >>> pre_svd_eps(TinyResNet(num_classes=10, head="gcp"))
      0.0
    """
    pre_svd_pattern(model)  # validates and rejects configurations without an SVD layer
    return float(model.dbn_eps) if model.stem_norm == "dbn" else 0.0


def pre_svd_features(intermediates: Any) -> Array:
    """The sown Pre-SVD layer output from an ``intermediates`` collection.

    Args:
      intermediates: the ``"intermediates"`` collection returned by ``apply``.

    Returns:
      The NHWC Pre-SVD output (the DBN sees it flattened over batch*H*W; GCP per image).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = TinyResNet(num_classes=10, head="gcp", gcp_dim=4)
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> v = model.init(jax.random.key(0), x, train=False)
      >>> _, state = model.apply(v, x, train=False, mutable=["intermediates"])
      >>> pre_svd_features(state["intermediates"]).shape
      (2, 4, 4, 4)
    """
    flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
    found = [leaf for path, leaf in flat
             if any(getattr(k, "key", None) == "pre_svd_features" for k in path)]
    if len(found) != 1:
        raise ValueError(f"expected one sown 'pre_svd_features', found {len(found)}")
    return found[0]
