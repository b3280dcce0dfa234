"""Pre-SVD weight treatments as Flax NNX layers (Sec. 4.2, docs/weight_treatments.md).

NNX versions of ``svdcond_jax.nn.SpectralNormConv``, ``OrthogonalDense`` and
``SkewOrthogonalConv``, thin wrappers over the same pure functions
(``svdcond_jax.nn.orthogonal_layers``), so both compute the same numbers. Conventions follow
``flax.nnx.SpectralNorm``: the constructor takes ``update_stats`` (default True) and stores
``use_running_average = not update_stats``, so ``model.train()`` / ``model.eval()`` switch it;
``__call__(x, update_stats=None)`` overrides it per call. Power-iteration vectors are
``nnx.BatchStat`` variables, the trainable weight the ``nnx.Param`` ``kernel``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from svdcond_jax.nn import _checks
from svdcond_jax.nn import orthogonal_layers as _ol
from svdcond_jax.orthogonal import as_matrix

__all__ = ["OrthogonalDense", "SkewOrthogonalConv", "SpectralNormConv"]

Array = jax.Array
Initializer = Callable[..., Array]

_DN = ("NHWC", "HWIO", "NHWC")
_LECUN_NORMAL = nnx.initializers.lecun_normal()
_ZEROS = nnx.initializers.zeros_init()
_HIGHEST = jax.lax.Precision.HIGHEST


def _update_stats(update_stats: bool | None, module: nnx.Module) -> bool:
    default = None if module.use_running_average is None else not module.use_running_average
    return _checks.mode(type(module).__name__, "update_stats", update_stats, default)


class SpectralNormConv(nnx.Module):
    """Convolution with a spectrally normalised kernel ``W / sigma_max(W)`` (Eq. 11), NNX.

    Same computation as ``svdcond_jax.nn.SpectralNormConv`` (see there and
    :func:`svdcond_jax.nn.orthogonal_layers.spectral_normalize`): ``sigma_max`` of the
    kernel reshaped to ``(kh*kw*in, out)`` by power iteration, ``init_power_iterations`` at
    construction and ``n_power_iterations`` per training call. A zero kernel gives a zero
    output with finite gradients. bfloat16/float16 inputs are computed in float32 and
    returned in their dtype (or ``dtype``); a NaN/inf kernel gives NaN.

    Attributes:
      kernel: ``nnx.Param`` (kh, kw, in, out), the raw weight.
      bias: ``nnx.Param`` (out,) or None.
      u: ``nnx.BatchStat`` (out,), the power-iteration vector (float32; float64 for float64
        params).
      use_running_average: True freezes ``u`` (set by ``eval()``), False updates it
        (``train()``).

    Args:
      in_features: input channels (>= 1).
      out_features: output channels (>= 1).
      kernel_size: int or (kh, kw).
      strides: int or (sh, sw).
      padding: "SAME", "VALID", "SAME_LOWER" or two (low, high) pairs.
      use_bias: add a bias.
      n_power_iterations: power iterations per training call.
      init_power_iterations: power iterations at construction.
      update_stats: initial mode (True: training, like ``nnx.SpectralNorm``).
      dtype: dtype of the result (None: the input's).
      param_dtype: dtype of kernel and bias.
      kernel_init: initializer of the raw kernel.
      bias_init: initializer of the bias.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Raises:
      TypeError / ValueError: at construction for a bad argument (naming it); at call time
        for a non-floating or non-NHWC ``x`` or one with the wrong channel count.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = SpectralNormConv(2, 4, 3, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((1, 5, 5, 2))).shape
      (1, 5, 5, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        use_bias: bool = False,
        n_power_iterations: int = 1,
        init_power_iterations: int = 15,
        update_stats: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = _LECUN_NORMAL,
        bias_init: Initializer = _ZEROS,
        rngs: nnx.Rngs,
    ):
        where = type(self).__name__
        _checks.check_int(where, "in_features", in_features, 1)
        _ol._check_spectral_norm_conv(
            where, features=out_features, kernel_size=kernel_size, strides=strides,
            padding=padding, n_power_iterations=n_power_iterations,
            init_power_iterations=init_power_iterations, dtype=dtype, param_dtype=param_dtype)
        kh, kw = _checks.pair(kernel_size)
        kernel = kernel_init(rngs.params(), (kh, kw, in_features, out_features), param_dtype)
        self.kernel = nnx.Param(kernel)
        self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                     if use_bias else None)
        sdtype = _ol._stats_dtype(param_dtype)
        matrix = as_matrix(kernel.astype(sdtype))[0]
        self.u = nnx.BatchStat(_ol.power_iteration(matrix, None, init_power_iterations)[0])
        self.in_features, self.out_features = in_features, out_features
        self.strides, self.padding = _checks.pair(strides), padding
        self.n_power_iterations = n_power_iterations
        self.use_running_average = not update_stats
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, x: Array, update_stats: bool | None = None) -> Array:
        """Convolve NHWC ``x`` with the normalised kernel.

        Args:
          x: (N, H, W, in_features), real floating.
          update_stats: run ``n_power_iterations`` and store the vector; None uses
            ``not self.use_running_average``.

        Returns:
          (N, H', W', out_features) in ``dtype`` (None: ``x.dtype``).
        """
        x = _check_nhwc(self, x)
        update = _update_stats(update_stats, self)
        cdtype = _checks.compute_dtype(x.dtype, self.param_dtype)
        w, u, _ = _ol.spectral_normalize(self.kernel[...].astype(cdtype),
                                         self.u[...].astype(cdtype),
                                         self.n_power_iterations if update else 0)
        if update:
            self.u[...] = u.astype(self.u[...].dtype)
        y = jax.lax.conv_general_dilated(x.astype(cdtype), w, self.strides, self.padding,
                                         dimension_numbers=_DN)
        if self.bias is not None:
            y = y + self.bias[...].astype(cdtype)
        return y.astype(self.dtype or x.dtype)


class OrthogonalDense(nnx.Module):
    """Dense layer with an orthogonal weight ``W = exp(A - A^T)`` (Eq. 13), NNX.

    Same computation as ``svdcond_jax.nn.OrthogonalDense``: the ``nnx.Param`` ``kernel`` is
    the raw square ``A`` of size ``n = max(in, out)`` (N(0, 1/n) init) and ``y = x W`` with
    ``W`` the top-left (in, out) block of ``exp(A - A^T)`` (``W W^T = I`` for in <= out,
    ``W^T W = I`` for in >= out). Called like ``nnx.Linear``: ``layer(x)``.
    bfloat16/float16 inputs are computed in float32 and returned in their dtype (or
    ``dtype``).

    Args:
      in_features: input features (>= 1).
      out_features: output features (>= 1).
      use_bias: add a bias.
      dtype: dtype of the result (None: the input's).
      param_dtype: dtype of kernel and bias.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Raises:
      TypeError / ValueError: at construction for a bad argument (naming it); at call time
        for a non-floating ``x`` or one with the wrong feature count.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = OrthogonalDense(3, 3, rngs=nnx.Rngs(0))
      >>> y = layer(jnp.eye(3))
      >>> bool(jnp.allclose(y @ y.T, jnp.eye(3), atol=1e-5))
      True
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        where = type(self).__name__
        _checks.check_int(where, "in_features", in_features, 1)
        _ol._check_orthogonal_dense(where, features=out_features, dtype=dtype,
                                   param_dtype=param_dtype)
        n = max(in_features, out_features)
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(n))
        self.kernel = nnx.Param(init(rngs.params(), (n, n), param_dtype))
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, x: Array) -> Array:
        """``x W (+ bias)`` for ``x`` of shape (..., in_features); returns (..., out)."""
        where = type(self).__name__
        x = _checks.check_input(where, x, min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{where}: expected {self.in_features} input features; "
                             f"got x.shape={x.shape}")
        cdtype = _checks.compute_dtype(x.dtype, self.param_dtype)
        w = _ol.orthogonal_dense_weight(self.kernel[...].astype(cdtype), self.in_features,
                                        self.out_features)
        y = jnp.matmul(x.astype(cdtype), w, precision=_HIGHEST)
        if self.bias is not None:
            y = y + self.bias[...].astype(cdtype)
        return y.astype(self.dtype or x.dtype)


class SkewOrthogonalConv(nnx.Module):
    """Skew Orthogonal Convolution ``y = exp(L) x`` (Singla & Feizi 2021), NNX.

    Same computation as ``svdcond_jax.nn.SkewOrthogonalConv`` (see there for the two
    normalisations, the measured norm preservation and the reference): raw ``nnx.Param``
    ``kernel`` ``P`` (kh, kw, c, c), ``c = max(in, out)``, N(0, 1/c) init;
    ``L = (P - P^T)/2`` scaled by ``correction / bound`` (``soc_kernel``); the input is
    zero-padded to c channels, the Taylor series applied (``soc_series``) and the first
    ``out`` channels returned. A training call (``update_stats`` True, the state after
    ``train()``) runs ``power_iterations`` and ``train_terms`` terms; an evaluation call
    (after ``eval()``) uses the stored vectors and ``eval_terms`` terms, as the reference
    ties both to ``module.training``. bfloat16/float16 inputs are computed in float32 and
    returned in their dtype (or ``dtype``).

    Attributes:
      kernel: ``nnx.Param`` (kh, kw, c, c), the raw ``P``.
      u1, u2, u3, u4: ``nnx.BatchStat`` power-iteration vectors of R1..R4 (sizes c*kw,
        c*kh, c*kh*kw, c).
      use_running_average: True for evaluation calls (``eval()``), False for training.

    Args:
      in_features: input channels (>= 1).
      out_features: output channels (>= 1).
      kernel_size: odd int or odd (kh, kw).
      normalization: "reference" (default, the paper's code) or "fantastic_four" (strict).
      train_terms: Taylor terms of a training call (>= 1).
      eval_terms: Taylor terms of an evaluation call (>= 1).
      correction: scale of the normalised ``L`` (None: 0.7, or 1.0 for 1x1).
      power_iterations: power iterations per training call.
      init_power_iterations: power iterations at construction.
      update_stats: initial mode (True: training, like ``nnx.SpectralNorm``).
      dtype: dtype of the result (None: the input's).
      param_dtype: dtype of ``P``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Raises:
      TypeError / ValueError: at construction for a bad argument (naming it), including an
        even kernel size; at call time for a non-floating or non-NHWC ``x`` or one with the
        wrong channel count.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = SkewOrthogonalConv(4, 4, rngs=nnx.Rngs(0))
      >>> layer.eval()
      >>> x = jax.random.normal(jax.random.key(1), (1, 6, 6, 4))
      >>> bool(jnp.allclose(jnp.linalg.norm(layer(x)), jnp.linalg.norm(x), rtol=1e-4))
      True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = (3, 3),
        *,
        normalization: str = "reference",
        train_terms: int = 5,
        eval_terms: int = 10,
        correction: float | None = None,
        power_iterations: int = 1,
        init_power_iterations: int = 50,
        update_stats: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        where = type(self).__name__
        _checks.check_int(where, "in_features", in_features, 1)
        _ol._check_skew_orthogonal_conv(
            where, features=out_features, kernel_size=kernel_size, train_terms=train_terms,
            eval_terms=eval_terms, correction=correction, power_iterations=power_iterations,
            init_power_iterations=init_power_iterations, normalization=normalization,
            dtype=dtype, param_dtype=param_dtype)
        kh, kw = _checks.pair(kernel_size)
        c = max(in_features, out_features)
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(c))
        p = init(rngs.params(), (kh, kw, c, c), param_dtype)
        self.kernel = nnx.Param(p)
        sdtype = _ol._stats_dtype(param_dtype)
        _, us = _ol.soc_kernel(p.astype(sdtype), None, init_power_iterations,
                               normalization=normalization, correction=correction)
        self.u1, self.u2, self.u3, self.u4 = (nnx.BatchStat(u) for u in us)
        self.in_features, self.out_features = in_features, out_features
        self.normalization, self.correction = normalization, correction
        self.train_terms, self.eval_terms = train_terms, eval_terms
        self.power_iterations = power_iterations
        self.use_running_average = not update_stats
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, x: Array, update_stats: bool | None = None) -> Array:
        """Apply ``exp(L)`` (truncated) to NHWC ``x``.

        Args:
          x: (N, H, W, in_features), real floating.
          update_stats: True for a training call (update the vectors, ``train_terms``),
            False for an evaluation call (``eval_terms``); None uses
            ``not self.use_running_average``.

        Returns:
          (N, H, W, out_features) in ``dtype`` (None: ``x.dtype``).
        """
        x = _check_nhwc(self, x)
        update = _update_stats(update_stats, self)
        cdtype = _checks.compute_dtype(x.dtype, self.param_dtype)
        variables = (self.u1, self.u2, self.u3, self.u4)
        kernel, us = _ol.soc_kernel(
            self.kernel[...].astype(cdtype), [v[...].astype(cdtype) for v in variables],
            self.power_iterations if update else 0, normalization=self.normalization,
            correction=self.correction)
        if update:
            for var, u in zip(variables, us, strict=True):
                var[...] = u.astype(var[...].dtype)
        terms = self.train_terms if update else self.eval_terms
        y = _ol.soc_series(x.astype(cdtype), kernel, terms, self.out_features)
        return y.astype(self.dtype or x.dtype)


def _check_nhwc(module: nnx.Module, x: Any) -> Array:
    """NHWC real floating input with ``module.in_features`` channels."""
    where = type(module).__name__
    x = _checks.check_input(where, x, ndim=4, layout="(N, H, W, C)")
    if x.shape[-1] != module.in_features:
        raise ValueError(f"{where}: expected {module.in_features} input channels; "
                         f"got x.shape={x.shape}")
    return x
