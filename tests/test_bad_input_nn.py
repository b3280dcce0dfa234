"""Bad input to the Flax layer (docs/README.md, "bad input"): no silent wrong results.

What the shapes, dtypes or static arguments decide raises TypeError/ValueError (at
construction or trace time) naming the argument; what only the values decide gives NaN under
``jit``. bfloat16/float16 inputs are computed in float32 and returned in their dtype.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svdcond_jax import models
from svdcond_jax import nn as L
from svdcond_jax import nnx as N
from svdcond_jax.nn import orthogonal_layers as ol

KEY = jax.random.key(0, impl="rbg")  # rbg: compiles much faster than threefry on CPU
# A low-precision output is the float32 result rounded once: within eps(dtype) relative,
# plus float32 round-off (two differently compiled programs) relative to the output scale.
_ROUNDOFF = 1e-5
NAN = "nan"


@dataclass(frozen=True)
class Case:
    """A bad input: ``run()`` raises ``outcome`` matching ``match``, or (``outcome=NAN``)
    returns arrays that must be entirely NaN."""

    id: str
    run: Callable[[], Any]
    outcome: Any
    match: str | None = None


def _x(shape, dtype=jnp.float32, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.asarray(x + 1j * x, dtype)
    return jnp.asarray(x * 3, dtype)


def _nan_at(x, index=(0,)):
    return x.at[index].set(jnp.nan)


def _rngs():
    return nnx.Rngs(0)


# --------------------------------------------------------------------- Linen helpers


def _dbn(x, use_running_average=False, **kw):
    layer = L.DecorrelatedBatchNorm(**kw)
    v = layer.init(KEY, x, use_running_average=True)
    return layer.apply(v, x, use_running_average=use_running_average, mutable=["batch_stats"])


def _gcp(x, use_running_average=False, **kw):
    layer = L.CovariancePooling(**kw)
    v = layer.init(KEY, x, use_running_average=True)
    return layer.apply(v, x, use_running_average=use_running_average, mutable=["batch_stats"])


def _conv(layer, x, update_stats=True):
    v = layer.init(KEY, x, update_stats=False)
    return layer.apply(v, x, update_stats=update_stats, mutable=["batch_stats"])


def _with_param(layer, x, value, init_kw, apply_kw, mutable=("batch_stats",)):
    """Initialise, set every param to ``value`` (e.g. NaN) and apply under jit."""
    v = layer.init(KEY, x, **init_kw)
    v = {**v, "params": jax.tree.map(lambda p: jnp.full_like(p, value), v["params"])}
    out = jax.jit(lambda v, x: layer.apply(v, x, mutable=list(mutable), **apply_kw))(v, x)
    return out[0]


def _resnet(x, train=True, **kw):
    model = models.TinyResNet(num_classes=3, **kw)
    v = model.init(KEY, x, train=False)
    return jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=["batch_stats"])[0])(v, x)


X4 = _x((4, 5, 5, 6))
XNAN = _nan_at(X4, (1, 2, 3, 0))

CASES = [
    # ---------------------------------------------------------------- DecorrelatedBatchNorm
    Case("dbn/int32", lambda: _dbn(X4.astype(jnp.int32)), TypeError, "x.dtype=int32"),
    Case("dbn/uint8", lambda: _dbn(X4.astype(jnp.uint8)), TypeError, "x.dtype=uint8"),
    Case("dbn/bool", lambda: _dbn(X4 > 0), TypeError, "x.dtype=bool"),
    Case("dbn/complex", lambda: _dbn(_x((4, 6), jnp.complex64)), TypeError, "complex64"),
    Case("dbn/rank1", lambda: _dbn(_x((6,))), ValueError, "x.shape"),
    Case("dbn/rank0", lambda: _dbn(jnp.float32(1.0)), ValueError, "x.shape"),
    Case("dbn/zero_channels", lambda: _dbn(jnp.ones((4, 0))), ValueError, "x.shape"),
    Case("dbn/groups_0", lambda: L.DecorrelatedBatchNorm(groups=0), ValueError, "groups=0"),
    Case("dbn/groups_-1", lambda: L.DecorrelatedBatchNorm(groups=-1), ValueError, "groups"),
    Case("dbn/groups_float", lambda: L.DecorrelatedBatchNorm(groups=2.0), TypeError, "groups"),
    Case("dbn/groups_not_dividing", lambda: _dbn(X4, groups=4), ValueError, "groups=4"),
    Case("dbn/momentum_1.5", lambda: L.DecorrelatedBatchNorm(momentum=1.5), ValueError,
         "momentum=1.5"),
    Case("dbn/momentum_neg", lambda: L.DecorrelatedBatchNorm(momentum=-0.1), ValueError,
         "momentum"),
    Case("dbn/momentum_nan", lambda: L.DecorrelatedBatchNorm(momentum=float("nan")),
         ValueError, "momentum"),
    Case("dbn/epsilon_neg", lambda: L.DecorrelatedBatchNorm(epsilon=-1e-3), ValueError,
         "epsilon"),
    Case("dbn/epsilon_inf", lambda: L.DecorrelatedBatchNorm(epsilon=float("inf")), ValueError,
         "epsilon"),
    Case("dbn/epsilon_str", lambda: L.DecorrelatedBatchNorm(epsilon="0.1"), TypeError,
         "epsilon"),
    Case("dbn/method", lambda: L.DecorrelatedBatchNorm(method="svd"), ValueError, "method"),
    Case("dbn/method_kwargs_list", lambda: L.DecorrelatedBatchNorm(method_kwargs=[1]),
         TypeError, "method_kwargs"),
    Case("dbn/method_kwargs_unknown",
         lambda: _dbn(X4, method_kwargs={"bogus": 1}), TypeError, "bogus"),
    # The options are checked at construction (before: only at the first call).
    Case("dbn/method_kwargs_unknown_at_construction",
         lambda: L.DecorrelatedBatchNorm(method_kwargs={"bogus": 1}), TypeError,
         r"DecorrelatedBatchNorm: method_kwargs=\{'bogus': 1\}.*bogus"),
    Case("dbn/method_kwargs_value_at_construction",
         lambda: L.DecorrelatedBatchNorm(method="newton_schulz", method_kwargs={"num_iters": 0}),
         ValueError, "num_iters"),
    Case("dbn/empty_batch_training", lambda: L.DecorrelatedBatchNorm().init(
        KEY, jnp.ones((0, 6)), use_running_average=False), ValueError,
         r"at least 2 samples per channel; got x.shape=\(0, 6\) \(0 samples\)"),
    Case("dbn/empty_batch_eval", lambda: _dbn(jnp.ones((0, 6)), use_running_average=True),
         ValueError, r"at least 1 sample per channel; got x.shape=\(0, 6\) \(0 samples\)"),
    Case("dbn/dtype_int", lambda: L.DecorrelatedBatchNorm(dtype=jnp.int32), TypeError, "dtype"),
    Case("dbn/param_dtype_int", lambda: L.DecorrelatedBatchNorm(param_dtype=jnp.int32),
         TypeError, "param_dtype"),
    Case("dbn/one_sample_training", lambda: _dbn(_x((1, 6))), ValueError, "samples"),
    Case("dbn/use_running_average_missing",
         lambda: L.DecorrelatedBatchNorm().init(KEY, X4), ValueError, "use_running_average"),
    Case("dbn/nan_training", lambda: jax.jit(lambda x: _dbn(x)[0])(XNAN), NAN),
    Case("dbn/inf_training", lambda: jax.jit(lambda x: _dbn(x)[0])(X4.at[0, 0, 0, 0].set(
        jnp.inf)), NAN),
    Case("dbn/nan_eval_position", lambda: jax.jit(lambda x: _dbn(  # a sample = a position
        x, use_running_average=True)[0][1, 2, 3])(XNAN), NAN),
    # NNX
    Case("nnx_dbn/num_features_0", lambda: N.DecorrelatedBatchNorm(0, rngs=_rngs()),
         ValueError, "num_features"),
    Case("nnx_dbn/num_features_neg", lambda: N.DecorrelatedBatchNorm(-3, rngs=_rngs()),
         ValueError, "num_features"),
    Case("nnx_dbn/num_features_float", lambda: N.DecorrelatedBatchNorm(3.5, rngs=_rngs()),
         TypeError, "num_features"),
    Case("nnx_dbn/groups_not_dividing",
         lambda: N.DecorrelatedBatchNorm(6, groups=4, rngs=_rngs()), ValueError, "groups=4"),
    Case("nnx_dbn/momentum", lambda: N.DecorrelatedBatchNorm(6, momentum=2, rngs=_rngs()),
         ValueError, "momentum"),
    Case("nnx_dbn/wrong_channels", lambda: N.DecorrelatedBatchNorm(5, rngs=_rngs())(X4),
         ValueError, "x.shape"),
    Case("nnx_dbn/int", lambda: N.DecorrelatedBatchNorm(6, rngs=_rngs())(X4.astype(jnp.int8)),
         TypeError, "x.dtype"),
    Case("nnx_dbn/one_sample_training",
         lambda: N.DecorrelatedBatchNorm(6, rngs=_rngs())(_x((1, 6))), ValueError, "samples"),
    Case("nnx_dbn/use_running_average_missing", lambda: N.DecorrelatedBatchNorm(
        6, use_running_average=None, rngs=_rngs())(X4), ValueError, "use_running_average"),
    Case("nnx_dbn/method_kwargs_unknown_at_construction", lambda: N.DecorrelatedBatchNorm(
        6, method_kwargs={"bogus": 1}, rngs=_rngs()), TypeError, "bogus"),
    Case("nnx_dbn/method_kwargs_value_at_construction", lambda: N.DecorrelatedBatchNorm(
        6, method="pade", method_kwargs={"lyapunov_iters": -1}, rngs=_rngs()), ValueError,
         "lyapunov_iters"),
    Case("nnx_dbn/empty_batch_eval", lambda: N.DecorrelatedBatchNorm(
        3, use_running_average=True, rngs=_rngs())(jnp.ones((0, 3))), ValueError,
         r"got x.shape=\(0, 3\) \(0 samples\)"),
    Case("nnx_dbn/empty_batch_training", lambda: N.DecorrelatedBatchNorm(3, rngs=_rngs())(
        jnp.ones((0, 3))), ValueError, r"got x.shape=\(0, 3\) \(0 samples\)"),
    Case("nnx_dbn/nan_training", lambda: nnx.jit(lambda m, x: m(x))(
        N.DecorrelatedBatchNorm(6, rngs=_rngs()), XNAN), NAN),
    # --------------------------------------------------------------------- CovariancePooling
    Case("gcp/dim_0", lambda: L.CovariancePooling(dim=0), ValueError, "dim=0"),
    Case("gcp/dim_neg", lambda: L.CovariancePooling(dim=-1), ValueError, "dim"),
    Case("gcp/dim_float", lambda: L.CovariancePooling(dim=2.5), TypeError, "dim"),
    Case("gcp/pre_svd", lambda: L.CovariancePooling(pre_svd="ol"), ValueError, "pre_svd"),
    Case("gcp/pre_svd_none", lambda: L.CovariancePooling(pre_svd=None), ValueError, "pre_svd"),
    Case("gcp/method", lambda: L.CovariancePooling(method="svd"), ValueError, "method"),
    Case("gcp/method_kwargs_at_construction",
         lambda: L.CovariancePooling(method_kwargs={"eig_floor": 1.5}), ValueError, "eig_floor"),
    Case("gcp/momentum", lambda: L.CovariancePooling(momentum=-1), ValueError, "momentum"),
    Case("gcp/empty_batch_training", lambda: _gcp(jnp.ones((0, 3, 3, 6)), dim=3), ValueError,
         r"got x.shape=\(0, 3, 3, 6\) \(0 samples\)"),
    Case("gcp/epsilon", lambda: L.CovariancePooling(epsilon=-1e-5), ValueError, "epsilon"),
    Case("gcp/dtype_int", lambda: L.CovariancePooling(dtype=jnp.int32), TypeError, "dtype"),
    Case("gcp/param_dtype_complex", lambda: L.CovariancePooling(param_dtype=jnp.complex64),
         TypeError, "param_dtype"),
    Case("gcp/rank3", lambda: _gcp(_x((4, 5, 6)), dim=3), ValueError, "x.shape"),
    Case("gcp/rank5", lambda: _gcp(_x((1, 4, 5, 5, 6)), dim=3), ValueError, "x.shape"),
    Case("gcp/int", lambda: _gcp(X4.astype(jnp.int32), dim=3), TypeError, "x.dtype"),
    Case("gcp/one_position", lambda: _gcp(_x((4, 1, 1, 6)), dim=3), ValueError,
         "2 positions"),
    Case("gcp/zero_channels", lambda: _gcp(jnp.ones((4, 3, 3, 0)), dim=3), ValueError,
         "x.shape"),
    Case("gcp/use_running_average_missing",
         lambda: L.CovariancePooling(dim=3).init(KEY, X4), ValueError, "use_running_average"),
    Case("gcp/nan_training", lambda: jax.jit(lambda x: _gcp(x, dim=3)[0])(XNAN), NAN),
    Case("gcp/nan_eval_image", lambda: jax.jit(lambda x: _gcp(
        x, dim=3, use_running_average=True)[0][1])(XNAN), NAN),
    # NNX
    Case("nnx_gcp/in_features_0", lambda: N.CovariancePooling(0, 3, rngs=_rngs()), ValueError,
         "in_features"),
    Case("nnx_gcp/dim_0", lambda: N.CovariancePooling(6, 0, rngs=_rngs()), ValueError, "dim"),
    Case("nnx_gcp/method_kwargs_at_construction", lambda: N.CovariancePooling(
        6, 3, method="newton_schulz", method_kwargs={"eig_floor": 0.1}, rngs=_rngs()),
         TypeError, "eig_floor"),
    Case("nnx_gcp/empty_batch_training", lambda: N.CovariancePooling(6, 3, rngs=_rngs())(
        jnp.ones((0, 3, 3, 6))), ValueError, r"got x.shape=\(0, 3, 3, 6\) \(0 samples\)"),
    Case("nnx_gcp/pre_svd", lambda: N.CovariancePooling(6, 3, pre_svd="x", rngs=_rngs()),
         ValueError, "pre_svd"),
    Case("nnx_gcp/wrong_channels", lambda: N.CovariancePooling(5, 3, rngs=_rngs())(X4),
         ValueError, "x.shape"),
    Case("nnx_gcp/bool", lambda: N.CovariancePooling(6, 3, rngs=_rngs())(X4 > 0), TypeError,
         "x.dtype"),
    Case("nnx_gcp/use_running_average_missing", lambda: N.CovariancePooling(
        6, 3, use_running_average=None, rngs=_rngs())(X4), ValueError, "use_running_average"),
    Case("nnx_gcp/nan_training", lambda: nnx.jit(lambda m, x: m(x))(
        N.CovariancePooling(6, 3, rngs=_rngs()), XNAN), NAN),
    # ---------------------------------------------------------------- pure GCP functions
    Case("cov_sqrt/int", lambda: L.covariance_sqrt_features(X4.astype(jnp.int32)), TypeError,
         "x.dtype"),
    Case("cov_sqrt/rank3", lambda: L.covariance_sqrt_features(_x((4, 5, 6))), ValueError,
         "x.shape"),
    Case("cov_sqrt/one_position", lambda: L.covariance_sqrt_features(_x((4, 1, 1, 6))),
         ValueError, "x.shape"),
    Case("cov_sqrt/method", lambda: L.covariance_sqrt_features(X4, method="qr"), ValueError,
         "method"),
    Case("cov_sqrt/nan_image", lambda: jax.jit(L.covariance_sqrt_features)(XNAN)[1], NAN),
    Case("upper_triangle/non_square", lambda: L.upper_triangle(jnp.ones((3, 4))), ValueError,
         "m.shape"),
    # ---------------------------------------------------------------- SpectralNormConv
    Case("sn/features_0", lambda: L.SpectralNormConv(0, 3), ValueError, "features=0"),
    Case("sn/features_neg", lambda: L.SpectralNormConv(-2, 3), ValueError, "features"),
    Case("sn/features_bool", lambda: L.SpectralNormConv(True, 3), TypeError, "features"),
    Case("sn/kernel_0", lambda: L.SpectralNormConv(4, 0), ValueError, "kernel_size"),
    Case("sn/kernel_neg", lambda: L.SpectralNormConv(4, -1), ValueError, "kernel_size"),
    Case("sn/kernel_1d", lambda: L.SpectralNormConv(4, (3,)), TypeError, "kernel_size"),
    Case("sn/kernel_float", lambda: L.SpectralNormConv(4, 2.5), TypeError, "kernel_size"),
    Case("sn/kernel_str", lambda: L.SpectralNormConv(4, "3"), TypeError, "kernel_size"),
    Case("sn/strides_0", lambda: L.SpectralNormConv(4, 3, strides=0), ValueError, "strides"),
    Case("sn/strides_neg", lambda: L.SpectralNormConv(4, 3, strides=(1, -1)), ValueError,
         "strides"),
    Case("sn/padding_str", lambda: L.SpectralNormConv(4, 3, padding="FULL"), ValueError,
         "padding"),
    Case("sn/padding_pairs", lambda: L.SpectralNormConv(4, 3, padding=[(1, 1)]), ValueError,
         "padding"),
    Case("sn/iters_neg", lambda: L.SpectralNormConv(4, 3, n_power_iterations=-1), ValueError,
         "n_power_iterations"),
    Case("sn/init_iters_neg", lambda: L.SpectralNormConv(4, 3, init_power_iterations=-1),
         ValueError, "init_power_iterations"),
    Case("sn/dtype_int", lambda: L.SpectralNormConv(4, 3, dtype=jnp.int8), TypeError, "dtype"),
    Case("sn/rank3", lambda: _conv(L.SpectralNormConv(4, 3), _x((5, 5, 6))), ValueError,
         "x.shape"),
    Case("sn/int", lambda: _conv(L.SpectralNormConv(4, 3), X4.astype(jnp.int32)), TypeError,
         "x.dtype"),
    Case("sn/complex", lambda: _conv(L.SpectralNormConv(4, 3), _x((1, 3, 3, 2), jnp.complex64)),
         TypeError, "x.dtype"),
    Case("sn/update_stats_missing",
         lambda: L.SpectralNormConv(4, 3).init(KEY, X4), TypeError, "update_stats"),
    Case("sn/nan_kernel", lambda: _with_param(L.SpectralNormConv(4, 3), X4, jnp.nan,
                                              {"update_stats": False}, {"update_stats": True}),
         NAN),
    Case("sn/inf_kernel", lambda: _with_param(L.SpectralNormConv(4, 3), X4, jnp.inf,
                                              {"update_stats": False}, {"update_stats": False}),
         NAN),
    Case("sn/nan_input_sample", lambda: jax.jit(lambda x: _conv(
        L.SpectralNormConv(4, 3), x)[0][1])(XNAN.at[1].set(jnp.nan)), NAN),
    # NNX
    Case("nnx_sn/in_features_0", lambda: N.SpectralNormConv(0, 4, 3, rngs=_rngs()), ValueError,
         "in_features"),
    Case("nnx_sn/out_features_0", lambda: N.SpectralNormConv(6, 0, 3, rngs=_rngs()),
         ValueError, "features"),
    Case("nnx_sn/kernel_0", lambda: N.SpectralNormConv(6, 4, 0, rngs=_rngs()), ValueError,
         "kernel_size"),
    Case("nnx_sn/strides_0", lambda: N.SpectralNormConv(6, 4, 3, 0, rngs=_rngs()), ValueError,
         "strides"),
    Case("nnx_sn/wrong_channels", lambda: N.SpectralNormConv(5, 4, 3, rngs=_rngs())(X4),
         ValueError, "x.shape"),
    Case("nnx_sn/int", lambda: N.SpectralNormConv(6, 4, 3, rngs=_rngs())(X4.astype(jnp.int32)),
         TypeError, "x.dtype"),
    Case("nnx_sn/nan_kernel", lambda: _nnx_nan_kernel(N.SpectralNormConv(6, 4, 3,
                                                                         rngs=_rngs()), X4),
         NAN),
    # ---------------------------------------------------------------- OrthogonalDense
    Case("od/features_0", lambda: L.OrthogonalDense(0), ValueError, "features"),
    Case("od/features_float", lambda: L.OrthogonalDense(1.0), TypeError, "features"),
    Case("od/dtype_bool", lambda: L.OrthogonalDense(3, dtype=jnp.bool_), TypeError, "dtype"),
    Case("od/rank0", lambda: L.OrthogonalDense(3).init(KEY, jnp.float32(1)), ValueError,
         "x.shape"),
    Case("od/zero_features", lambda: L.OrthogonalDense(3).init(KEY, jnp.ones((3, 0))),
         ValueError, "x.shape"),
    Case("od/int", lambda: L.OrthogonalDense(3).init(KEY, jnp.ones((2, 3), jnp.int32)),
         TypeError, "x.dtype"),
    Case("od/nan_kernel", lambda: _with_param(L.OrthogonalDense(3), _x((2, 3)), jnp.nan, {}, {},
                                              mutable=()), NAN),
    Case("od/nan_input_row", lambda: jax.jit(lambda x: (lambda layer: layer.apply(
        layer.init(KEY, x), x))(L.OrthogonalDense(3))[0])(_nan_at(_x((2, 3)), (0, 1))), NAN),
    # NNX
    Case("nnx_od/in_features_0", lambda: N.OrthogonalDense(0, 3, rngs=_rngs()), ValueError,
         "in_features"),
    Case("nnx_od/out_features_neg", lambda: N.OrthogonalDense(3, -1, rngs=_rngs()), ValueError,
         "features"),
    Case("nnx_od/wrong_features", lambda: N.OrthogonalDense(3, 3, rngs=_rngs())(_x((2, 4))),
         ValueError, "x.shape"),
    Case("nnx_od/nan_kernel", lambda: _nnx_nan_kernel(N.OrthogonalDense(3, 3, rngs=_rngs()),
                                                      _x((2, 3))), NAN),
    # ---------------------------------------------------------------- SkewOrthogonalConv
    Case("soc/kernel_even", lambda: L.SkewOrthogonalConv(4, kernel_size=(2, 2)), ValueError,
         "odd"),
    Case("soc/kernel_0", lambda: L.SkewOrthogonalConv(4, kernel_size=0), ValueError,
         "kernel_size"),
    Case("soc/kernel_neg", lambda: L.SkewOrthogonalConv(4, kernel_size=-3), ValueError,
         "kernel_size"),
    Case("soc/strides_2", lambda: L.SkewOrthogonalConv(4, strides=2), ValueError, "stride"),
    Case("soc/strides_0", lambda: L.SkewOrthogonalConv(4, strides=0), ValueError, "strides"),
    Case("soc/train_terms_0", lambda: L.SkewOrthogonalConv(4, train_terms=0), ValueError,
         "train_terms"),
    Case("soc/eval_terms_neg", lambda: L.SkewOrthogonalConv(4, eval_terms=-1), ValueError,
         "eval_terms"),
    Case("soc/train_terms_float", lambda: L.SkewOrthogonalConv(4, train_terms=2.0), TypeError,
         "train_terms"),
    Case("soc/correction_0", lambda: L.SkewOrthogonalConv(4, correction=0.0), ValueError,
         "correction"),
    Case("soc/correction_neg", lambda: L.SkewOrthogonalConv(4, correction=-0.7), ValueError,
         "correction"),
    Case("soc/correction_nan", lambda: L.SkewOrthogonalConv(4, correction=float("nan")),
         ValueError, "correction"),
    Case("soc/normalization", lambda: L.SkewOrthogonalConv(4, normalization="strict"),
         ValueError, "normalization"),
    Case("soc/power_iterations_neg", lambda: L.SkewOrthogonalConv(4, power_iterations=-1),
         ValueError, "power_iterations"),
    Case("soc/features_0", lambda: L.SkewOrthogonalConv(0), ValueError, "features"),
    Case("soc/rank3", lambda: _conv(L.SkewOrthogonalConv(4), _x((5, 5, 6))), ValueError,
         "x.shape"),
    Case("soc/int", lambda: _conv(L.SkewOrthogonalConv(4), X4.astype(jnp.int16)), TypeError,
         "x.dtype"),
    Case("soc/update_stats_missing", lambda: L.SkewOrthogonalConv(4).init(KEY, X4), TypeError,
         "update_stats"),
    Case("soc/nan_kernel", lambda: _with_param(L.SkewOrthogonalConv(6), X4, jnp.nan,
                                               {"update_stats": False}, {"update_stats": True}),
         NAN),
    Case("soc/inf_kernel", lambda: _with_param(L.SkewOrthogonalConv(6), X4, jnp.inf,
                                               {"update_stats": False},
                                               {"update_stats": False}), NAN),
    Case("soc/nan_input_sample", lambda: jax.jit(lambda x: _conv(
        L.SkewOrthogonalConv(6), x)[0][1])(XNAN.at[1].set(jnp.nan)), NAN),
    # NNX
    Case("nnx_soc/kernel_even", lambda: N.SkewOrthogonalConv(4, 4, 4, rngs=_rngs()),
         ValueError, "odd"),
    Case("nnx_soc/in_features_0", lambda: N.SkewOrthogonalConv(0, 4, rngs=_rngs()), ValueError,
         "in_features"),
    Case("nnx_soc/normalization", lambda: N.SkewOrthogonalConv(4, 4, normalization="x",
                                                               rngs=_rngs()),
         ValueError, "normalization"),
    Case("nnx_soc/wrong_channels", lambda: N.SkewOrthogonalConv(4, 4, rngs=_rngs())(X4),
         ValueError, "x.shape"),
    Case("nnx_soc/nan_kernel", lambda: _nnx_nan_kernel(N.SkewOrthogonalConv(6, 6, rngs=_rngs()),
                                                       X4), NAN),
    # ---------------------------------------------------------------- pure weight functions
    Case("power_iteration/rank3", lambda: ol.power_iteration(jnp.ones((2, 2, 2)), None, 1),
         ValueError, "matrix.shape"),
    Case("power_iteration/iters_neg", lambda: ol.power_iteration(jnp.ones((2, 2)), None, -1),
         ValueError, "num_iters"),
    Case("power_iteration/u_shape", lambda: ol.power_iteration(jnp.ones((2, 3)),
                                                               jnp.ones(2), 1),
         ValueError, "u.shape"),
    Case("spectral_normalize/rank1", lambda: ol.spectral_normalize(jnp.ones(3), None, 1),
         ValueError, "x.shape"),
    Case("soc_kernel/non_square", lambda: ol.soc_kernel(jnp.ones((3, 3, 2, 4)), None, 1),
         ValueError, "p.shape"),
    Case("soc_kernel/normalization", lambda: ol.soc_kernel(jnp.ones((3, 3, 2, 2)), None, 1,
                                                           normalization="x"),
         ValueError, "normalization"),
    Case("soc_series/terms_neg", lambda: ol.soc_series(X4, jnp.zeros((3, 3, 6, 6)), -1, 6),
         ValueError, "terms"),
    Case("soc_series/too_many_channels", lambda: ol.soc_series(X4, jnp.zeros((3, 3, 4, 4)), 2,
                                                               4),
         ValueError, "x.shape"),
    Case("orthogonal_dense_weight/small", lambda: ol.orthogonal_dense_weight(jnp.ones((2, 2)),
                                                                             3, 2),
         ValueError, "a.shape"),
    Case("pre_svd_conv/ow_stride", lambda: _in_compact(lambda x: L.pre_svd_conv(
        x, pre_svd="ow", features=4, kernel_size=(3, 3), update_stats=True, name="c",
        strides=2)), ValueError, "stride"),
    Case("pre_svd_conv/name", lambda: _in_compact(lambda x: L.pre_svd_conv(
        x, pre_svd="svd", features=4, kernel_size=(3, 3), update_stats=True, name="c")),
         ValueError, "pre_svd"),
    Case("nnx_pre_svd_conv/ow_stride", lambda: N.pre_svd_conv("ow", 6, 4, 3, strides=2,
                                                              rngs=_rngs()),
         ValueError, "stride"),
    Case("nnx_pre_svd_conv/name", lambda: N.pre_svd_conv("bad", 6, 4, 3, rngs=_rngs()),
         ValueError, "pre_svd"),
    # ---------------------------------------------------------------- ResNet and factories
    Case("resnet/num_classes_0", lambda: models.TinyResNet(num_classes=0), ValueError,
         "num_classes=0"),
    Case("resnet/num_classes_neg", lambda: models.ResNet18(num_classes=-1), ValueError,
         "num_classes"),
    Case("resnet/num_classes_float", lambda: models.ResNet50(num_classes=2.0), TypeError,
         "num_classes"),
    Case("resnet/stage_sizes_empty", lambda: models.ResNet(
        3, stage_sizes=(), block_cls=models.ResNetBlock), ValueError, "stage_sizes"),
    Case("resnet/stage_sizes_neg", lambda: models.ResNet(
        3, stage_sizes=(2, -1), block_cls=models.ResNetBlock), ValueError, "stage_sizes"),
    Case("resnet/stage_sizes_zero", lambda: models.ResNet(
        3, stage_sizes=(2, 0), block_cls=models.ResNetBlock), ValueError, "stage_sizes"),
    Case("resnet/stage_sizes_str", lambda: models.ResNet(
        3, stage_sizes="22", block_cls=models.ResNetBlock), TypeError, "stage_sizes"),
    Case("resnet/stage_sizes_float", lambda: models.ResNet(
        3, stage_sizes=(1.5,), block_cls=models.ResNetBlock), TypeError, "stage_sizes"),
    Case("resnet/block_cls", lambda: models.ResNet(3, stage_sizes=(1,), block_cls=int),
         TypeError, "block_cls"),
    Case("resnet/num_filters_0", lambda: models.TinyResNet(num_classes=3, num_filters=0),
         ValueError, "num_filters"),
    Case("resnet/stem", lambda: models.TinyResNet(num_classes=3, stem="mnist"), ValueError,
         "stem"),
    Case("resnet/stem_norm", lambda: models.TinyResNet(num_classes=3, stem_norm="gn"),
         ValueError, "stem_norm"),
    Case("resnet/head", lambda: models.TinyResNet(num_classes=3, head="gmp"), ValueError,
         "head"),
    Case("resnet/pre_svd", lambda: models.TinyResNet(num_classes=3, head="gcp", pre_svd="ol"),
         ValueError, "pre_svd"),
    Case("resnet/pre_svd_without_svd_layer", lambda: models.TinyResNet(num_classes=3,
                                                                       pre_svd="sn"),
         ValueError, "pre_svd"),
    Case("resnet/two_svd_layers", lambda: models.TinyResNet(num_classes=3, stem_norm="dbn",
                                                            head="gcp"),
         ValueError, "two SVD"),
    Case("resnet/ow_imagenet_stem", lambda: models.ResNet18(num_classes=3, stem_norm="dbn",
                                                            pre_svd="ow"),
         ValueError, "stride"),
    Case("resnet/meta_method", lambda: models.TinyResNet(num_classes=3, meta_method="svd"),
         ValueError, "method"),
    Case("resnet/meta_kwargs", lambda: models.TinyResNet(num_classes=3, meta_kwargs=[1]),
         TypeError, "method_kwargs"),
    Case("resnet/meta_kwargs_unknown_at_construction",
         lambda: models.TinyResNet(num_classes=3, meta_kwargs={"bogus": 1}), TypeError, "bogus"),
    Case("resnet/empty_batch_dbn_eval_init", lambda: models.TinyResNet(
        num_classes=10, stem_norm="dbn").init(KEY, jnp.ones((0, 8, 8, 3)), train=False),
         ValueError, r"DecorrelatedBatchNorm: .*got x.shape=\(0, 8, 8, 8\) \(0 samples\)"),
    Case("resnet/dbn_eps_neg", lambda: models.TinyResNet(num_classes=3, dbn_eps=-1.0),
         ValueError, "dbn_eps"),
    Case("resnet/dbn_groups_0", lambda: models.TinyResNet(num_classes=3, dbn_groups=0),
         ValueError, "dbn_groups"),
    Case("resnet/dbn_groups_not_dividing", lambda: models.TinyResNet(
        num_classes=3, stem_norm="dbn", dbn_groups=3), ValueError, "dbn_groups=3"),
    Case("resnet/gcp_dim_0", lambda: models.TinyResNet(num_classes=3, gcp_dim=0), ValueError,
         "gcp_dim"),
    Case("resnet/dtype_int", lambda: models.TinyResNet(num_classes=3, dtype=jnp.int32),
         TypeError, "dtype"),
    Case("resnet/act", lambda: models.TinyResNet(num_classes=3, act=None), TypeError, "act"),
    Case("resnet/fixed_keyword", lambda: models.ResNet18(num_classes=3, stage_sizes=(1,)),
         TypeError, "stage_sizes"),
    Case("resnet/unknown_keyword", lambda: models.TinyResNet(num_classes=3, bogus=1),
         TypeError, "bogus"),
    Case("resnet/rank3_images", lambda: _resnet(_x((8, 8, 3))), ValueError, "x.shape"),
    Case("resnet/uint8_images", lambda: _resnet(jnp.ones((2, 8, 8, 3), jnp.uint8)), TypeError,
         "x.dtype=uint8"),
    Case("resnet/bool_images", lambda: _resnet(jnp.ones((2, 8, 8, 3), bool)), TypeError,
         "x.dtype=bool"),
    Case("resnet/zero_channels", lambda: _resnet(jnp.ones((2, 8, 8, 0))), ValueError,
         "x.shape"),
    Case("resnet/gcp_1x1_map", lambda: _resnet(_x((2, 1, 1, 3)), head="gcp", gcp_dim=4),
         ValueError, "2 positions"),
    Case("resnet/nan_image_dbn", lambda: _resnet(_nan_at(_x((2, 6, 6, 3)), (1, 2, 2, 0)),
                                                 stem_norm="dbn"), NAN),
    Case("resnet/nan_image_gcp_eval", lambda: _resnet(_nan_at(_x((2, 6, 6, 3)), (1, 2, 2, 0)),
                                                      train=False, head="gcp",
                                                      gcp_dim=4)[1], NAN),
    Case("pre_svd_pattern/not_a_resnet", lambda: models.pre_svd_pattern(nn.Dense(3)),
         TypeError, "ResNet"),
    Case("pre_svd_pattern/no_svd_layer", lambda: models.pre_svd_pattern(
        models.TinyResNet(num_classes=3)), ValueError, "no SVD meta-layer"),
    Case("pre_svd_eps/not_a_resnet", lambda: models.pre_svd_eps("TinyResNet"), TypeError,
         "ResNet"),
    Case("pre_svd_features/none_sown", lambda: models.pre_svd_features({}), ValueError,
         "found 0"),
    Case("pre_svd_features/two_sown", lambda: models.pre_svd_features(
        {"a": {"pre_svd_features": (1,)}, "b": {"pre_svd_features": (2,)}}), ValueError,
         "found 2"),
]


def _nnx_nan_kernel(module, x):
    module.kernel[...] = jnp.full_like(module.kernel[...], jnp.nan)
    return nnx.jit(lambda m, x: m(x))(module, x)


def _in_compact(fn):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return fn(x)

    return Net().init(KEY, X4)


def test_cases_have_unique_ids():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case):
    if case.outcome == NAN:
        out = case.run()
        leaves = jax.tree.leaves(out)
        assert leaves and all(np.all(np.isnan(np.asarray(leaf, np.float32))) for leaf in leaves)
        return
    with pytest.raises(case.outcome, match=case.match):
        case.run()


# --------------------------------------------------------------------- low precision

LOW = [jnp.bfloat16, jnp.float16]


def _linen_layers():
    x = _x((2, 5, 5, 4))
    return [
        ("dbn", L.DecorrelatedBatchNorm(), x, {"use_running_average": False},
         {"use_running_average": True}),
        ("gcp", L.CovariancePooling(dim=3, pre_svd="ow"), x, {"use_running_average": False},
         {"use_running_average": True}),
        ("sn", L.SpectralNormConv(3, 3), x, {"update_stats": True}, {"update_stats": False}),
        ("od", L.OrthogonalDense(3), x, {}, {}),
        ("soc", L.SkewOrthogonalConv(5), x, {"update_stats": True}, {"update_stats": False}),
    ]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("index", range(5), ids=["dbn", "gcp", "sn", "od", "soc"])
def test_linen_low_precision_in_same_dtype_out(index, dtype):
    """Computed in float32: the float32 result on the same input, rounded once."""
    _, layer, x, call_kw, init_kw = _linen_layers()[index]
    x = x.astype(dtype)
    variables = layer.init(KEY, x, **init_kw)
    apply = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"], **call_kw)[0])
    y, ref = apply(variables, x), apply(variables, x.astype(jnp.float32))
    assert y.dtype == dtype and ref.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), ref,
                               rtol=float(jnp.finfo(dtype).eps),
                               atol=_ROUNDOFF * float(np.abs(ref).max()))


def _nnx_layers(dtype):
    rngs = nnx.Rngs(0)
    return [
        N.DecorrelatedBatchNorm(4, rngs=rngs), N.CovariancePooling(4, 3, pre_svd="sn", rngs=rngs),
        N.SpectralNormConv(4, 3, 3, rngs=rngs), N.OrthogonalDense(4, 3, rngs=rngs),
        N.SkewOrthogonalConv(4, 5, rngs=rngs),
    ]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("index", range(5), ids=["dbn", "gcp", "sn", "od", "soc"])
def test_nnx_low_precision_in_same_dtype_out(index, dtype):
    x = _x((2, 5, 5, 4)).astype(dtype)
    model = _nnx_layers(dtype)[index]
    model.eval()  # deterministic: both calls see the same state
    y, ref = model(x), model(x.astype(jnp.float32))
    assert y.dtype == dtype and ref.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), ref,
                               rtol=float(jnp.finfo(dtype).eps),
                               atol=_ROUNDOFF * float(np.abs(ref).max()))
