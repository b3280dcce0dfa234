"""Running statistics that one non-finite training batch cannot poison (Linen and NNX).

The user's own loop of the README (``optax.apply_if_finite`` around the optimizer, the new
``batch_stats`` taken unconditionally from ``mutable=`` in Linen, ``nnx.Optimizer`` in NNX):
``apply_if_finite`` keeps the parameters, and the layers keep their running statistics, when
a batch holds a NaN. So a run with a NaN batch among clean ones evaluates exactly like the
run without it, and the layers count the rejected batch in ``nonfinite_batches``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import svdcond_jax as sc
from svdcond_jax.nn.whitening import NONFINITE_BATCHES, finite_or_previous

LAYERS = ["dbn", "gcp"]
_RNG = np.random.default_rng(0)
CLEAN = [jnp.asarray(_RNG.standard_normal((8, 4, 4, 2)), jnp.float32) for _ in range(3)]
LABELS = jnp.arange(8) % 4
NAN_BATCH = CLEAN[0].at[3, 1, 2, 0].set(jnp.nan)
EVAL = jnp.asarray(_RNG.standard_normal((5, 4, 4, 2)), jnp.float32)


def _batches(with_nan: bool) -> list[jax.Array]:
    """Clean batches 0, 1, 2, and (with_nan) a NaN batch after the first."""
    return [CLEAN[0], NAN_BATCH, CLEAN[1], CLEAN[2]] if with_nan else CLEAN


def _tx() -> optax.GradientTransformation:
    return optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)


def _loss(logits: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


def _counters(tree) -> list[int]:
    return [int(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if NONFINITE_BATCHES in jax.tree_util.keystr(path)]


def _floats(tree) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


class LinenNet(nn.Module):
    """A conv stem (the Pre-SVD layer), then decorrelated BN or covariance pooling."""

    layer: str

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(6, (3, 3), use_bias=False, name="stem_conv")(x)
        if self.layer == "dbn":
            x = sc.DecorrelatedBatchNorm(epsilon=1e-2, momentum=0.5)(
                x, use_running_average=not train)
            x = nn.relu(x).mean(axis=(1, 2))
        else:
            x = sc.CovariancePooling(dim=3, momentum=0.5)(x, use_running_average=not train)
        return nn.Dense(4, name="head")(x)


@functools.cache
def _linen_train_step(layer: str):
    """The README's Linen train step (compiled once per layer for both runs)."""
    model, tx = LinenNet(layer), _tx()

    @jax.jit
    def train_step(params, batch_stats, opt_state, x):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                          mutable=["batch_stats"])
            return _loss(logits), updates["batch_stats"]

        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    return train_step


def _linen_run(layer: str, with_nan: bool):
    model, train_step = LinenNet(layer), _linen_train_step(layer)
    variables = model.init(jax.random.key(0), CLEAN[0], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = _tx().init(params)
    for x in _batches(with_nan):
        params, batch_stats, opt_state = train_step(params, batch_stats, opt_state, x)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, EVAL, train=False)
    return logits, params, batch_stats


class NnxNet(nnx.Module):
    def __init__(self, layer: str, rngs: nnx.Rngs):
        self.stem_conv = nnx.Conv(2, 6, (3, 3), use_bias=False, rngs=rngs)
        if layer == "dbn":
            self.layer = sc.nnx.DecorrelatedBatchNorm(6, epsilon=1e-2, momentum=0.5, rngs=rngs)
        else:  # 3 x 3 covariances: 6 upper-triangle features
            self.layer = sc.nnx.CovariancePooling(6, 3, momentum=0.5, rngs=rngs)
        self.pool = layer == "dbn"
        self.head = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        x = self.layer(self.stem_conv(x))
        if self.pool:
            x = nnx.relu(x).mean(axis=(1, 2))
        return self.head(x)


@nnx.jit
def _nnx_train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: _loss(m(x)))(model)
    optimizer.update(model, grads)


def _nnx_run(layer: str, with_nan: bool):
    model = NnxNet(layer, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    for x in _batches(with_nan):
        _nnx_train_step(model, optimizer, x)
    model.eval()
    return model(EVAL), nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("run", [_linen_run, _nnx_run], ids=["linen", "nnx"])
def test_a_nan_batch_leaves_the_running_statistics_as_without_it(run, layer):
    logits, params, stats = run(layer, with_nan=True)
    ref_logits, ref_params, ref_stats = run(layer, with_nan=False)
    assert bool(jnp.all(jnp.isfinite(logits)))
    _assert_same(params, ref_params)  # apply_if_finite's part
    _assert_same(_floats(stats), _floats(ref_stats))  # the layers' part
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-6,
                               atol=1e-6)
    assert _counters(stats) == [1] and _counters(ref_stats) == [0]


def test_finite_or_previous_keeps_every_leaf_on_any_non_finite_entry():
    previous = (jnp.zeros(3), jnp.eye(2))
    new = (jnp.ones(3), jnp.full((2, 2), 2.0))
    kept, count = jax.jit(finite_or_previous)(new, previous, jnp.int32(4))
    _assert_same(kept, new)
    assert int(count) == 4
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        kept, count = jax.jit(finite_or_previous)((new[0], new[1].at[1, 0].set(bad)), previous,
                                                  jnp.int32(4))
        _assert_same(kept, previous)  # both leaves kept, not only the bad one
        assert int(count) == 5
