"""1x1 convolutions as matrix products equal lax.conv_general_dilated, values and gradients."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from svdcond_jax.models.resnet import BottleneckResNetBlock
from svdcond_jax.nn.pointwise_conv import conv_general_dilated

SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _dn(nd: int) -> tuple[str, str, str]:
    s = SPATIAL[nd]
    return f"N{s}C", f"{s}IO", f"N{s}C"


def _primitives(fn, *args) -> set[str]:
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", ["SAME", "VALID", "zeros"])
def test_pointwise_matches_lax_values_and_gradients(x64, nd, stride, padding):
    rng = np.random.default_rng(nd * 10 + stride)
    size = (7, 6, 5)[:nd]  # odd and even extents: the stride's rounding matters
    x = jnp.asarray(rng.normal(size=(2, *size, 3)))
    k = jnp.asarray(rng.normal(size=(*(1,) * nd, 3, 4)))
    pad = [(0, 0)] * nd if padding == "zeros" else padding
    strides = (stride,) * nd
    ours = partial(conv_general_dilated, window_strides=strides, padding=pad,
                   dimension_numbers=_dn(nd))
    ref = partial(lax.conv_general_dilated, window_strides=strides, padding=pad,
                  dimension_numbers=_dn(nd))
    assert "conv_general_dilated" not in _primitives(ours, x, k)
    np.testing.assert_allclose(ours(x, k), ref(x, k), rtol=1e-12, atol=1e-12)
    dy = jnp.asarray(rng.normal(size=ref(x, k).shape))
    for got, want in zip(jax.vjp(ours, x, k)[1](dy), jax.vjp(ref, x, k)[1](dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    {"rhs_shape": (3, 3, 4, 5)},                                  # not 1x1
    {"padding": [(1, 1), (0, 0)]},                                # a 1x1 kernel with padding
    {"rhs_dilation": (2, 2)},
    {"lhs_dilation": (2, 1), "padding": [(0, 0), (0, 0)]},
    {"feature_group_count": 2, "rhs_shape": (1, 1, 2, 4)},
    {"dimension_numbers": ("NCHW", "OIHW", "NCHW"), "rhs_shape": (5, 4, 1, 1)},
    {"dimension_numbers": None, "rhs_shape": (5, 4, 1, 1)},      # lax's default is NCHW
])
def test_everything_else_is_lax_conv(kwargs):
    kwargs = dict(kwargs)
    rhs_shape = kwargs.pop("rhs_shape", (1, 1, 4, 5))
    call = {"window_strides": (1, 1), "padding": "SAME",
            "dimension_numbers": ("NHWC", "HWIO", "NHWC"), **kwargs}
    x = jnp.ones((2, 4, 6, 4))
    k = jnp.ones(rhs_shape)
    ours = partial(conv_general_dilated, **call)
    assert "conv_general_dilated" in _primitives(ours, x, k)
    np.testing.assert_array_equal(ours(x, k), lax.conv_general_dilated(x, k, **call))


def test_bottleneck_block_is_unchanged_by_the_pointwise_path():
    """Same parameter tree and (float32 round-off level) the same outputs as plain nn.Conv."""
    norm = partial(nn.BatchNorm, use_running_average=False)
    plain = BottleneckResNetBlock(8, partial(nn.Conv, use_bias=False), norm, nn.relu, (2, 2))
    fast = plain.clone(conv=partial(nn.Conv, use_bias=False,
                                    conv_general_dilated=conv_general_dilated))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    variables = plain.init(jax.random.key(1), x)
    variables_fast = fast.init(jax.random.key(1), x)
    assert jax.tree.structure(variables) == jax.tree.structure(variables_fast)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables_fast), strict=True):
        np.testing.assert_array_equal(a, b)
    y, _ = plain.apply(variables, x, mutable=["batch_stats"])
    y_fast, _ = fast.apply(variables, x, mutable=["batch_stats"])
    # Unit-variance BN outputs summed over <= 16 * 9 terms: float32 rounding only.
    np.testing.assert_allclose(y_fast, y, atol=1e-4)
