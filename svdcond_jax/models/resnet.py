"""ResNets with an SVD meta-layer: decorrelated-BN stem and/or covariance-pooling head.

In the style of flax ``examples/imagenet/models.py``: one :class:`ResNet` module with
``stage_sizes`` and ``block_cls``, the convolution and normalisation injected into the
blocks, and the variants as documented factory functions (:func:`ResNet18`, ...).

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

from svdcond_jax.nn import _checks
from svdcond_jax.nn.pointwise_conv import conv_general_dilated
from svdcond_jax.nn.pooling import CovariancePooling, check_pre_svd, pre_svd_conv
from svdcond_jax.nn.whitening import DecorrelatedBatchNorm

Array = jax.Array
ModuleDef = Any

STEMS = ("imagenet", "cifar")
STEM_NORMS = ("bn", "dbn")
HEADS = ("gap", "gcp")


class ResNetBlock(nn.Module):
    """Basic residual block (two 3x3 convs), as torchvision's BasicBlock.

    Attributes:
      filters: output channels.
      conv: convolution constructor (``partial(nn.Conv, use_bias=False, dtype=...)``).
      norm: normalisation constructor (``partial(nn.BatchNorm, use_running_average=...)``).
      act: activation.
      strides: stride of the first convolution and of the projection shortcut.

    Example:
      >>> import functools, flax.linen as nn, jax, jax.numpy as jnp
      >>> block = ResNetBlock(4, conv=functools.partial(nn.Conv, use_bias=False),
      ...     norm=functools.partial(nn.BatchNorm, use_running_average=True), act=nn.relu,
      ...     strides=(2, 2))
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> block.apply(block.init(jax.random.key(0), x), x).shape
      (1, 4, 4, 4)
    """

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
    """Bottleneck block (1x1, 3x3 with the stride, 1x1 x4), as torchvision's v1.5.

    Attributes:
      filters: output channels of the 1x1/3x3 convs (the block outputs 4x).
      conv: convolution constructor (``partial(nn.Conv, use_bias=False, dtype=...)``).
      norm: normalisation constructor (``partial(nn.BatchNorm, use_running_average=...)``).
      act: activation.
      strides: stride of the 3x3 convolution and of the projection shortcut.

    Example:
      >>> import functools, flax.linen as nn, jax, jax.numpy as jnp
      >>> block = BottleneckResNetBlock(4, conv=functools.partial(nn.Conv, use_bias=False),
      ...     norm=functools.partial(nn.BatchNorm, use_running_average=True), act=nn.relu,
      ...     strides=(2, 2))
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> block.apply(block.init(jax.random.key(0), x), x).shape
      (1, 4, 4, 16)
    """

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


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, ResNet):
        raise TypeError(f"{where}: model must be a svdcond_jax.models.ResNet; "
                        f"got {type(model).__name__}")


def check_config(model: ResNet) -> None:
    """Raise ValueError/TypeError for an invalid ResNet option or combination of options.

    Called when a ResNet is constructed (and by :func:`pre_svd_pattern`); the message names
    the attribute and its value.

    Args:
      model: the ResNet.

    Raises:
      TypeError: for an attribute of the wrong type (e.g. a float ``num_classes``, a
        ``block_cls`` that is not a Flax module class, an integer ``dtype``).
      ValueError: for a bad value or combination (see the ResNet docstring).

    Example:
      >>> check_config(TinyResNet(num_classes=10, head="gcp"))
    """
    where = type(model).__name__
    _checks.check_int(where, "num_classes", model.num_classes, 1)
    if isinstance(model.stage_sizes, (str, bytes)) or not isinstance(model.stage_sizes,
                                                                      Sequence):
        raise TypeError(f"{where}: stage_sizes must be a sequence of ints; "
                        f"got stage_sizes={model.stage_sizes!r}")
    if len(model.stage_sizes) == 0:
        raise ValueError(f"{where}: stage_sizes must name at least one stage; "
                         f"got stage_sizes={model.stage_sizes!r}")
    for size in model.stage_sizes:
        _checks.check_int(where, "stage_sizes entry", size, 1)
    if not (isinstance(model.block_cls, type) and issubclass(model.block_cls, nn.Module)):
        raise TypeError(f"{where}: block_cls must be a Flax module class such as ResNetBlock; "
                        f"got block_cls={model.block_cls!r}")
    _checks.check_int(where, "num_filters", model.num_filters, 1)
    for field, value, valid in (("stem", model.stem, STEMS),
                                ("stem_norm", model.stem_norm, STEM_NORMS),
                                ("head", model.head, HEADS)):
        _checks.check_choice(where, field, value, valid)
    check_pre_svd(model.pre_svd, where)
    _checks.check_method(where, model.meta_method, model.meta_kwargs)
    _checks.check_real(where, "dbn_eps", model.dbn_eps, low=0.0)
    _checks.check_bool(where, "dbn_eps_relative", model.dbn_eps_relative)
    groups = _checks.check_int(where, "dbn_groups", model.dbn_groups, 1)
    if model.stem_norm == "dbn" and model.num_filters % groups:
        raise ValueError(f"{where}: dbn_groups={groups} must divide "
                         f"num_filters={model.num_filters}")
    _checks.check_int(where, "gcp_dim", model.gcp_dim, 1)
    if model.input_channels is not None:
        _checks.check_int(where, "input_channels", model.input_channels, 1)
    _checks.check_dtype(where, "dtype", model.dtype)
    if not callable(model.act):
        raise TypeError(f"{where}: act must be callable; got act={model.act!r}")
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

    Call convention (the flax examples' for whole models): ``model.apply(variables, x,
    train=True, mutable=["batch_stats"])`` for a training step (batch statistics, running
    averages and power-iteration vectors updated), ``train=False`` for evaluation. Inside,
    the norms get ``use_running_average=not train`` and the Pre-SVD layer
    ``update_stats=train``.

    dtypes: convolutions and norms compute in ``dtype`` (None: float32, or float64 for
    float64 images); the meta-layer statistics, power iterations and the SOC series always
    in at least float32. The logits are in ``dtype`` (None: the images' dtype), so
    bfloat16 images give bfloat16 logits.

    Attributes:
      num_classes: classifier outputs (>= 1).
      stage_sizes: blocks per stage (non-empty, each >= 1).
      block_cls: ``ResNetBlock`` or ``BottleneckResNetBlock``.
      num_filters: channels of the stem and the first stage (>= 1).
      stem: "imagenet" (7x7/2 conv + max pool) or "cifar" (3x3/1 conv, Fig. 6).
      stem_norm: "bn" or "dbn" (decorrelated BN, Eq. 43).
      head: "gap" (global average pool) or "gcp" (covariance pooling, Eq. 44).
      pre_svd: weight treatment of the Pre-SVD conv: "none" | "sn" | "ow".
      meta_method: meta-layer method of the DBN / GCP (``meta_layer.METHODS``).
      meta_kwargs: options of the meta-layer method.
      dbn_eps: eps*I >= 0 added to the DBN covariance.
      dbn_eps_relative: add dbn_eps * trace(P) / d instead (scale-free ridge;
        ``DecorrelatedBatchNorm.relative_epsilon``).
      dbn_groups: channel groups of the DBN (must divide ``num_filters``).
      gcp_dim: channels of the GCP reduction conv (>= 1).
      input_channels: keep only the first ``input_channels`` channels of the images (None:
        all). The digits pipeline repeats its grey channel to 3 (the CIFAR layout);
        ``input_channels=1`` feeds the one grey channel, so a 3x3 stem sees 9-dimensional
        patches and its weight gradient is not confined to a rank-9 subspace of 27 inputs.
      axis_name: BatchNorm/DBN axis name under pmap/shard_map (None under jit).
      dtype: computation dtype of convs and norms and dtype of the logits (None: see
        above).
      act: activation.

    Raises:
      TypeError / ValueError: at construction for a bad attribute or combination
        (:func:`check_config`); at call time for images that are not a real floating
        (B, H, W, C) array, or a GCP head that sees fewer than 2 positions per image.

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
    dbn_eps_relative: bool = False
    dbn_groups: int = 1
    gcp_dim: int = 256
    input_channels: int | None = None
    axis_name: str | None = None
    dtype: Any = None
    act: Callable[[Array], Array] = nn.relu

    def __post_init__(self) -> None:
        check_config(self)
        super().__post_init__()

    def _norm(self, train: bool, dtype: Any) -> ModuleDef:
        return partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, dtype=dtype, axis_name=self.axis_name)

    def _stem(self, x: Array, train: bool, dtype: Any) -> Array:
        """Stem conv (the Pre-SVD layer under DBN) + stem norm + act (+ max pool)."""
        imagenet = self.stem == "imagenet"
        kernel, strides = ((7, 7), 2) if imagenet else ((3, 3), 1)
        padding = [(3, 3), (3, 3)] if imagenet else [(1, 1), (1, 1)]
        treatment = self.pre_svd if self.stem_norm == "dbn" else "none"
        x = pre_svd_conv(x, pre_svd=treatment, features=self.num_filters, kernel_size=kernel,
                         strides=strides, padding=padding, update_stats=train,
                         name="stem_conv", dtype=dtype)
        if self.stem_norm == "dbn":
            self.sow("intermediates", "pre_svd_features", x)
            x = DecorrelatedBatchNorm(
                use_running_average=not train, epsilon=self.dbn_eps,
                relative_epsilon=self.dbn_eps_relative, groups=self.dbn_groups,
                method=self.meta_method, method_kwargs=self.meta_kwargs,
                axis_name=self.axis_name, dtype=dtype, name="stem_norm")(x)
        else:
            x = self._norm(train, dtype)(name="stem_norm")(x)
        x = self.act(x)
        if imagenet:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x

    def _head(self, x: Array, train: bool, dtype: Any) -> Array:
        if self.head == "gap":
            return jnp.mean(x, axis=(1, 2))
        return CovariancePooling(dim=self.gcp_dim, method=self.meta_method,
                                 method_kwargs=self.meta_kwargs, pre_svd=self.pre_svd,
                                 axis_name=self.axis_name, dtype=dtype, name="head")(
            x, use_running_average=not train)

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        """Logits of a batch of images.

        Args:
          x: NHWC images (B, H, W, C), real floating (normalise integer images first).
          train: training call (batch statistics, running averages and power-iteration
            vectors updated; pass ``mutable=["batch_stats"]``) or evaluation call.

        Returns:
          (B, num_classes) logits in ``dtype`` (None: ``x.dtype``).
        """
        x = _checks.check_input(type(self).__name__, x, ndim=4, layout="(B, H, W, C)")
        if self.input_channels is not None:
            if x.shape[-1] < self.input_channels:
                raise ValueError(f"{type(self).__name__}: input_channels="
                                 f"{self.input_channels} but the images have {x.shape[-1]} "
                                 f"channels; got {x.shape=}")
            x = x[..., :self.input_channels]
        out_dtype = self.dtype or x.dtype
        dtype = self.dtype or _checks.compute_dtype(x.dtype)
        # 1x1 convs as matrix products: XLA:CPU's 1x1 weight gradient is 5x slower as a
        # convolution (svdcond_jax/nn/pointwise_conv.py); same parameters and outputs.
        conv = partial(nn.Conv, use_bias=False, dtype=dtype,
                       conv_general_dilated=conv_general_dilated)
        x = self._stem(x, train, dtype)
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv,
                                   norm=self._norm(train, dtype), act=self.act,
                                   name=f"stage{i + 1}_block{j}")(x)
        x = self._head(x, train, dtype)
        x = nn.Dense(self.num_classes, dtype=dtype, name="fc")(x)
        return jnp.asarray(x, out_dtype)


def _build(name: str, num_classes: int, kwargs: dict[str, Any], **fixed: Any) -> ResNet:
    """ResNet(num_classes, **fixed, **kwargs), rejecting keywords that the factory fixes."""
    clash = sorted(set(kwargs) & set(fixed))
    if clash:
        raise TypeError(f"{name}: {clash} fixed by this factory; use ResNet(...) to set them")
    return ResNet(num_classes=num_classes, **fixed, **kwargs)


_FACTORY_DOC = """{about}

Args:
  num_classes: classifier outputs (>= 1).
  **kwargs: any other ResNet attribute (see :class:`ResNet`): ``num_filters``,
    ``stem`` ("imagenet" | "cifar"), ``stem_norm`` ("bn" | "dbn"), ``head`` ("gap" |
    "gcp"), ``pre_svd`` ("none" | "sn" | "ow"), ``meta_method``, ``meta_kwargs``,
    ``dbn_eps``, ``dbn_groups``, ``gcp_dim``, ``input_channels``, ``axis_name``,
    ``dtype``, ``act``.{defaults}

Returns:
  ``ResNet(num_classes=num_classes, {fixed}, **kwargs)``.
  Call it as ``model.apply(variables, x, train=..., mutable=["batch_stats"])`` on NHWC
  images.

Raises:
  TypeError: for a keyword that this factory fixes ({fixed_names}) or that ResNet
    does not have.
  ValueError: for a bad attribute value (see :class:`ResNet`).

Example:
  >>> model = {name}(num_classes=10)
  >>> model.stage_sizes, model.block_cls.__name__, model.stem, model.num_filters
  {example}
"""


def _spell(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else repr(value)


def _factory(name: str, about: str, defaults: dict[str, Any] | None = None,
             **fixed: Any) -> Callable[..., ResNet]:
    """A documented network factory ``name(num_classes, **kwargs) -> ResNet``.

    ``fixed`` attributes cannot be given (TypeError); ``defaults`` can be overridden.
    """
    defaults = defaults or {}

    def factory(num_classes: int, **kwargs: Any) -> ResNet:
        return _build(name, num_classes, {**defaults, **kwargs}, **fixed)

    model = ResNet(num_classes=10, **fixed, **defaults)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = _FACTORY_DOC.format(
        about=about, name=name,
        defaults="\n    Defaults here: " + ", ".join(f"``{k}={v!r}``" for k, v in defaults.items())
        + "." if defaults else "",
        fixed=", ".join(f"{k}={_spell(v)}" for k, v in fixed.items()),
        fixed_names=", ".join(fixed),
        example=(model.stage_sizes, model.block_cls.__name__, model.stem, model.num_filters))
    return factory


ResNet18 = _factory("ResNet18", """ResNet-18: basic blocks, stages (2, 2, 2, 2).

With the defaults torchvision's ImageNet ResNet-18 (11,689,512 params at 1000 classes);
``head="gcp"`` is the GCP network of Table 5.""",
                    stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)

ResNet34 = _factory("ResNet34", """ResNet-34: basic blocks, stages (3, 4, 6, 3).

With the defaults torchvision's ImageNet ResNet-34 (21,797,672 params at 1000 classes).""",
                    stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)

ResNet50 = _factory("ResNet50", """ResNet-50: bottleneck blocks, stages (3, 4, 6, 3).

With the defaults torchvision's ImageNet ResNet-50 v1.5 (25,557,032 params at 1000
classes).""",
                    stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)

CifarResNet18 = _factory("CifarResNet18", """ResNet-18 with the CIFAR stem (Fig. 6).

A 3x3 stride-1 stem conv and no max pool.

Basic blocks, stages (2, 2, 2, 2).""",
                         stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock, stem="cifar")

CifarResNet50 = _factory("CifarResNet50", """ResNet-50 with the CIFAR stem (Fig. 6).

A 3x3 stride-1 stem conv and no max pool.
Bottleneck blocks, stages (3, 4, 6, 3); with ``stem_norm="dbn"`` the decorrelated-BN
network of Tables 1-4 (Appendix B.1).""",
                         stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock,
                         stem="cifar")

TinyResNet = _factory("TinyResNet", """A small two-stage ResNet for tests and demos.

Basic blocks, stages (1, 1); ``num_filters`` defaults to 8 and ``stem`` to "cifar"
(both may be given).""",
                      defaults={"num_filters": 8, "stem": "cifar"},
                      stage_sizes=(1, 1), block_cls=ResNetBlock)


def pre_svd_pattern(model: ResNet) -> str:
    """Regex matching exactly the Pre-SVD trainable kernel's '/'-joined param path.

    For NOG / OLR / orthogonal treatments (``pre_svd_sgd(..., pre_svd=pattern)``) and the
    conditioning monitor.

    Args:
      model: a ResNet (any variant).

    Returns:
      ``r"^stem_conv/kernel$"`` for the DBN stem, ``r"^head/pre_svd_conv/kernel$"`` for GCP.

    Raises:
      TypeError: if ``model`` is not a :class:`ResNet`.
      ValueError: if the configuration has no SVD meta-layer.

    Example:
      >>> pre_svd_pattern(CifarResNet50(num_classes=100, stem_norm="dbn"))
      '^stem_conv/kernel$'
    """
    _check_model(model, "pre_svd_pattern")
    check_config(model)
    if model.stem_norm == "dbn":
        return r"^stem_conv/kernel$"
    if model.head == "gcp":
        return r"^head/pre_svd_conv/kernel$"
    raise ValueError("model has no SVD meta-layer (stem_norm='bn', head='gap'), so no "
                     "Pre-SVD layer")


def pre_svd_eps(model: ResNet) -> float:
    """The eps*I the meta-layer adds to the Pre-SVD covariance (dbn_eps for DBN, 0 for GCP).

    Args:
      model: a ResNet (any variant).

    Returns:
      ``model.dbn_eps`` for the DBN stem, 0.0 for the GCP head.

    Raises:
      TypeError: if ``model`` is not a :class:`ResNet`.
      ValueError: if the configuration has no SVD meta-layer.

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

    Raises:
      ValueError: unless exactly one ``pre_svd_features`` was sown (e.g. the model has no
        SVD meta-layer, or ``mutable=["intermediates"]`` was not passed).

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
