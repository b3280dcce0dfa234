"""The NNX layers equal the Linen layers (same pure math) and follow flax.nnx conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from svdcond_jax import nn as linen_layers
from svdcond_jax import nnx as nnx_layers

KEY = jax.random.key(0, impl="rbg")  # rbg: compiles much faster than threefry on CPU


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _correlated(seed, shape):
    """Features with a random channel mixing (kappa ~ 36, well conditioned) and an offset."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    rotation, _ = np.linalg.qr(rng.standard_normal((c, c)))
    mixing = np.linspace(0.5, 3.0, c)[:, None] * rotation
    return jnp.asarray(rng.standard_normal(shape) @ mixing + rng.standard_normal(c), jnp.float32)


def _load_tree(module, tree):
    for name, value in tree.items():
        if isinstance(value, dict):
            _load_tree(getattr(module, name), value)
        else:
            variable = getattr(module, name)
            assert variable[...].shape == value.shape, name
            variable[...] = jnp.asarray(value, variable[...].dtype)


def _load(module, variables):
    """Writes Linen variables ({"params": ..., "batch_stats": ...}) into the NNX module: the
    NNX attribute paths are the Linen paths without the collection."""
    for collection in variables.values():
        _load_tree(module, collection)


def _read(module, tree):
    """The NNX module's values at the paths of a Linen-style nested dict."""
    return {name: _read(getattr(module, name), value) if isinstance(value, dict)
            else getattr(module, name)[...] for name, value in tree.items()}


def _perturb(tree, seed):
    """Random (deterministic) values of the same shapes: no test passes by init symmetry."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [
        jnp.asarray(leaf + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves])


def _close(a, b):
    """Equal to float32 round-off: both run the same pure functions on the same values."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * max(np.abs(y).max(), 1e-30))


def _compare(linen, nnx_module, x, variables, *, train_kwargs, eval_kwargs, stats=True):
    """Loads identical variables into both and compares outputs (and statistics) in both
    modes; returns the Linen training output."""
    _load(nnx_module, variables)
    y_linen, updates = linen.apply(variables, x, mutable=["batch_stats"], **train_kwargs)
    y_nnx = nnx_module(x, **train_kwargs)
    _close(y_nnx, y_linen)
    if stats:
        _close(_read(nnx_module, updates["batch_stats"]), updates["batch_stats"])
    _close(nnx_module(x, **eval_kwargs),
           linen.apply({**variables, **updates}, x, **eval_kwargs))
    return y_linen


@pytest.mark.parametrize("groups", [1, 2])
def test_decorrelated_batch_norm(groups):
    x = _correlated(0, (8, 3, 3, 6))
    linen = linen_layers.DecorrelatedBatchNorm(epsilon=1e-3, groups=groups, momentum=0.8)
    variables = _perturb(linen.init(KEY, x, use_running_average=False), 1)
    model = nnx_layers.DecorrelatedBatchNorm(6, epsilon=1e-3, groups=groups, momentum=0.8,
                                             rngs=nnx.Rngs(0))
    y = _compare(linen, model, x, variables,
                 train_kwargs={"use_running_average": False},
                 eval_kwargs={"use_running_average": True})
    assert np.abs(np.asarray(y)).max() > 0.1


@pytest.mark.parametrize("pre_svd", ["none", "sn", "ow"])
def test_covariance_pooling(pre_svd):
    x = _normal(2, (3, 4, 4, 5))
    linen = linen_layers.CovariancePooling(dim=6, pre_svd=pre_svd, momentum=0.7)
    variables = _perturb(linen.init(KEY, x, use_running_average=False), 3)
    model = nnx_layers.CovariancePooling(5, 6, pre_svd=pre_svd, momentum=0.7, rngs=nnx.Rngs(0))
    _compare(linen, model, x, variables, train_kwargs={"use_running_average": False},
             eval_kwargs={"use_running_average": True})


@pytest.mark.parametrize("use_bias,strides", [(False, 1), (True, 2)])
def test_spectral_norm_conv(use_bias, strides):
    x = _normal(4, (2, 6, 6, 3))
    linen = linen_layers.SpectralNormConv(4, 3, strides=strides, use_bias=use_bias)
    variables = _perturb(linen.init(KEY, x, update_stats=False), 5)
    model = nnx_layers.SpectralNormConv(3, 4, 3, strides=strides, use_bias=use_bias,
                                        rngs=nnx.Rngs(0))
    _compare(linen, model, x, variables, train_kwargs={"update_stats": True},
             eval_kwargs={"update_stats": False})


@pytest.mark.parametrize("cin,cout,use_bias", [(4, 4, False), (3, 5, True), (5, 3, False)])
def test_orthogonal_dense(cin, cout, use_bias):
    x = _normal(6, (7, cin))
    linen = linen_layers.OrthogonalDense(cout, use_bias=use_bias)
    variables = _perturb(linen.init(KEY, x), 7)
    model = nnx_layers.OrthogonalDense(cin, cout, use_bias=use_bias, rngs=nnx.Rngs(0))
    _load(model, variables)
    _close(model(x), linen.apply(variables, x))


@pytest.mark.parametrize("normalization", ["reference", "fantastic_four"])
@pytest.mark.parametrize("cin,cout,k", [(3, 5, 3), (4, 4, 1)])
def test_skew_orthogonal_conv(cin, cout, k, normalization):
    x = _normal(8, (2, 5, 5, cin))
    linen = linen_layers.SkewOrthogonalConv(cout, kernel_size=k, normalization=normalization)
    variables = _perturb(linen.init(KEY, x, update_stats=False), 9)
    model = nnx_layers.SkewOrthogonalConv(cin, cout, k, normalization=normalization,
                                          rngs=nnx.Rngs(0))
    _compare(linen, model, x, variables, train_kwargs={"update_stats": True},
             eval_kwargs={"update_stats": False})


def test_initial_power_vectors_equal_linen():
    """Same kernel, same deterministic start vector and iterations: same initial state."""
    x = _normal(10, (1, 4, 4, 3))
    model = nnx_layers.SkewOrthogonalConv(3, 3, rngs=nnx.Rngs(0))
    linen = linen_layers.SkewOrthogonalConv(3)
    p = model.kernel[...]
    _, stats = linen.apply({"params": {"kernel": p}}, x, update_stats=False,
                           mutable=["batch_stats"])
    _close([model.u1[...], model.u2[...], model.u3[...], model.u4[...]],
           [stats["batch_stats"][f"u{i}"] for i in range(1, 5)])


# ------------------------------------------------------------------ flax.nnx conventions


def test_train_and_eval_switch_every_layer():
    class Net(nnx.Module):
        def __init__(self, rngs):
            # No initial power iterations: a training call must move the start vectors.
            self.conv = nnx_layers.SkewOrthogonalConv(3, 4, init_power_iterations=0,
                                                      rngs=rngs)
            self.sn = nnx_layers.SpectralNormConv(4, 4, 1, init_power_iterations=0, rngs=rngs)
            self.dbn = nnx_layers.DecorrelatedBatchNorm(4, rngs=rngs)
            self.head = nnx_layers.CovariancePooling(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(self.dbn(self.sn(self.conv(x))))

    net = Net(nnx.Rngs(0))
    x = _normal(11, (2, 4, 4, 3))
    stats = lambda: jax.tree.map(np.asarray, nnx.state(net, nnx.BatchStat))
    before = stats()
    net(x)  # training mode by default, as nnx.BatchNorm / nnx.SpectralNorm
    after_train = stats()
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after_train)
    counters = {"nonfinite_batches"}  # a clean batch leaves them at 0
    moved = [v for path, v in jax.tree_util.tree_leaves_with_path(changed)
             if path[-2].key not in counters]
    assert len(moved) >= 7 and all(moved)  # every statistic / power vector moved
    assert [int(net.dbn.nonfinite_batches[...]), int(net.head.nonfinite_batches[...])] == [0, 0]
    net.eval()
    assert net.dbn.use_running_average and net.sn.use_running_average
    assert net.head.bn.use_running_average and net.conv.use_running_average
    net(x)
    same = jax.tree.map(np.array_equal, after_train, stats())
    assert all(jax.tree.leaves(same))
    net.train()
    assert not net.conv.use_running_average


def test_soc_eval_mode_uses_eval_terms():
    model = nnx_layers.SkewOrthogonalConv(3, 3, train_terms=1, eval_terms=10, rngs=nnx.Rngs(0))
    x = _normal(12, (1, 5, 5, 3))
    model.eval()
    y_eval = model(x)
    np.testing.assert_allclose(jnp.linalg.norm(y_eval), jnp.linalg.norm(x), rtol=1e-5)
    y_train = model(x, update_stats=True)  # one term: I + L, visibly not norm-preserving
    assert abs(float(jnp.linalg.norm(y_train) / jnp.linalg.norm(x)) - 1) > 1e-3


def test_jitted_training_step_updates_parameters_and_statistics():
    model = nnx_layers.CovariancePooling(3, 4, pre_svd="ow", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = _normal(13, (2, 4, 4, 3))

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    kernel = np.asarray(model.pre_svd_conv.kernel[...])
    u1 = np.asarray(model.pre_svd_conv.u1[...])
    mean = np.asarray(model.bn.mean[...])
    assert np.isfinite(float(step(model, optimizer, x)))
    assert not np.array_equal(kernel, model.pre_svd_conv.kernel[...])
    assert not np.array_equal(u1, model.pre_svd_conv.u1[...])
    assert not np.array_equal(mean, model.bn.mean[...])


@pytest.mark.parametrize("make", [
    lambda: nnx_layers.SpectralNormConv(3, 4, 3, rngs=nnx.Rngs(0)),
    lambda: nnx_layers.SkewOrthogonalConv(3, 4, rngs=nnx.Rngs(0)),
], ids=["sn", "ow"])
def test_zero_kernel_is_finite_and_sgd_leaves_it(make):
    model = make()
    model.kernel[...] = jnp.zeros_like(model.kernel[...])
    x, target = _normal(14, (2, 5, 5, 3)), _normal(15, (2, 5, 5, 4))

    @nnx.jit
    def step(model):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        model.kernel[...] = model.kernel[...] - 0.1 * grads.kernel[...]
        return loss, grads

    for _ in range(4):
        loss, grads = step(model)
        for leaf in [loss, *jax.tree.leaves(grads), *jax.tree.leaves(nnx.state(model))]:
            assert np.all(np.isfinite(np.asarray(leaf)))
    assert float(jnp.abs(model.kernel[...]).max()) > 0


def test_wrong_input_channels_raise():
    model = nnx_layers.SpectralNormConv(3, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        model(jnp.ones((1, 4, 4, 2)))
