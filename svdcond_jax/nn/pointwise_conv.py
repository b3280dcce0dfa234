"""1x1 convolutions as matrix products: a drop-in for ``lax.conv_general_dilated``.

A 1x1 convolution over channels-last features is the matrix product
``x.reshape(-1, C_in) @ kernel.reshape(C_in, C_out)`` (after subsampling the spatial axes
by the stride). Written as a ``dot``, its weight gradient is the product
``x^T dy`` of the same (N*H*W, C) matrices; written as a convolution, XLA:CPU computes that
gradient as a convolution with the batch as the feature axis, which needs both operands
transposed first and, on the 2-core development CPU, ran 5x slower than the product
(CIFAR ResNet-50 stage 1, x (32, 32, 32, 256), dy (32, 32, 32, 64): 131 ms vs 26 ms of CPU
time; the transposes were 25% of the whole train step; docs/performance.md). The bottleneck
ResNets are two thirds 1x1 convolutions.

Pass :func:`conv_general_dilated` to ``flax.linen.Conv(conv_general_dilated=...)``: the
parameters (names, shapes, initialisation) are unchanged, and every convolution that is not
a plain channels-last 1x1 one goes to ``lax.conv_general_dilated`` as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _is_channels_last(dimension_numbers: Any, ndim: int) -> bool:
    """True for dimension numbers equivalent to NH..WC / H..WIO / NH..WC."""
    spatial = "HWDXYZ"[: ndim - 2]
    expected = lax.conv_dimension_numbers(
        (1,) * ndim, (1,) * ndim, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    if dimension_numbers is None:
        return False  # lax's default is channels-first (NCHW)
    if isinstance(dimension_numbers, tuple) and all(isinstance(s, str)
                                                    for s in dimension_numbers):
        dimension_numbers = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim,
                                                       dimension_numbers)
    return tuple(dimension_numbers) == tuple(expected)


def _no_padding(padding: str | Sequence[tuple[int, int]]) -> bool:
    """A 1x1 kernel pads nothing under "SAME"/"VALID" or explicit zero pairs."""
    if isinstance(padding, str):
        return padding.upper() in ("SAME", "VALID")
    return all(tuple(p) == (0, 0) for p in padding)


def _ones(values: Sequence[int] | None) -> bool:
    return values is None or all(v == 1 for v in values)


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``lax.conv_general_dilated`` with channels-last 1x1 convolutions as one ``dot``.

    Same signature and result as ``jax.lax.conv_general_dilated`` (up to float rounding:
    the sums run in another order). The ``dot`` path is taken for a kernel whose spatial
    extent is all ones, channels-last dimension numbers (NHWC/HWIO/NHWC in any number of
    spatial dimensions), no padding ("SAME", "VALID" or zeros), no dilation, one feature
    and batch group; the stride subsamples the input first (x[:, ::s, ::s, :]).

    Args:
      lhs: input (N, *spatial, C_in).
      rhs: kernel (*spatial, C_in, C_out).
      window_strides: strides.
      padding: as in ``lax.conv_general_dilated``.
      lhs_dilation: input dilation.
      rhs_dilation: kernel dilation.
      dimension_numbers: as in ``lax.conv_general_dilated``.
      feature_group_count: feature groups.
      batch_group_count: batch groups.
      precision: dot / convolution precision.
      preferred_element_type: accumulation / output dtype.

    Returns:
      The convolution output (N, *spatial_out, C_out).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax import lax
      >>> x, k = jnp.ones((2, 4, 4, 3)), jnp.ones((1, 1, 3, 5))
      >>> dn = ("NHWC", "HWIO", "NHWC")
      >>> y = conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=dn)
      >>> y.shape, float(y[0, 0, 0, 0])
      ((2, 2, 2, 5), 3.0)
      >>> bool(jnp.allclose(y, lax.conv_general_dilated(x, k, (2, 2), "SAME",
      ...                                                dimension_numbers=dn)))
      True
    """
    pointwise = (
        lhs.ndim >= 3
        and rhs.ndim == lhs.ndim
        and all(d == 1 for d in rhs.shape[:-2])
        and _is_channels_last(dimension_numbers, lhs.ndim)
        and _no_padding(padding)
        and _ones(lhs_dilation)
        and _ones(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
    )
    if not pointwise:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    x = lhs[(slice(None), *(slice(None, None, s) for s in window_strides), slice(None))]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), rhs.reshape(rhs.shape[-2:]), precision=precision,
                preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], rhs.shape[-1])
