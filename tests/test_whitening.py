"""Tests for DecorrelatedBatchNorm (ZCA whitening, Eq. 43, docs/applications.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from svdcond_jax import meta_layer
from svdcond_jax.nn import DecorrelatedBatchNorm

KEY = jax.random.key(0, impl="rbg")  # rbg: compiles much faster than threefry on CPU


def _correlated(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """NHWC features with a random channel mixing (correlated, kappa ~36) and an offset."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    rotation, _ = np.linalg.qr(rng.standard_normal((channels, channels)))
    mixing = np.linspace(0.5, 3.0, channels)[:, None] * rotation
    x = rng.standard_normal(shape) @ mixing + rng.standard_normal(channels)
    return jnp.asarray(x, jnp.float32)


def _rank_deficient(seed: int, batch: int = 4, size: int = 8) -> jax.Array:
    """3x3 conv of a 3-channel image into 64 channels: covariance rank <= 27 of 64."""
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 64)) / 3.0, jnp.float32)
    return jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cov64(x) -> np.ndarray:
    """Float64 NumPy covariance of (..., C) features over all leading axes (Eq. 2)."""
    flat = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    flat = flat - flat.mean(0)
    return flat.T @ flat / flat.shape[0]


def _train_apply(layer, x, variables=None):
    """Initialise (if needed) and run one training step; returns (y, new batch_stats)."""
    if variables is None:
        variables = layer.init(KEY, x)
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    return y, updates["batch_stats"], variables


@pytest.mark.parametrize("seed,shape", [(0, (8, 5, 5, 4)), (1, (16, 4, 4, 8)),
                                        (2, (64, 1, 1, 3))])
def test_full_rank_input_is_whitened_to_identity(seed, shape):
    x = _correlated(seed, shape)
    assert np.linalg.cond(_cov64(x)) > 5.0  # the input really is correlated
    y, _, _ = _train_apply(DecorrelatedBatchNorm(use_running_average=False, epsilon=0.0), x)
    np.testing.assert_allclose(_cov64(y), np.eye(shape[-1]), atol=2e-3)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, shape[-1]).mean(0), 0.0, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_deficient_input_is_bounded_by_eps(seed):
    eps = 1e-2
    x = _rank_deficient(seed)
    lam = np.linalg.eigvalsh(_cov64(x))
    assert np.sum(lam > 1e-6 * lam.max()) <= 27  # rank-deficient as docs/conditioning.md
    layer = DecorrelatedBatchNorm(use_running_average=False, epsilon=eps)
    y, stats, _ = _train_apply(layer, x)
    assert np.all(np.isfinite(np.asarray(y)))
    out = np.linalg.eigvalsh(_cov64(y))
    # Exact: cov(y) = S P S with S = (P + eps I)^{-1/2}, eigenvalues lam / (lam + eps) <= 1.
    np.testing.assert_allclose(out, np.sort(lam / (lam + eps)), atol=2e-3)
    w = np.asarray(stats["whitening"], np.float64)
    batch_whitening = (w[0] - 0.9 * np.eye(64)) / 0.1  # undo the EMA from identity
    assert np.abs(np.linalg.eigvalsh(batch_whitening)).max() <= 1.0 / np.sqrt(eps) * 1.001


def test_evaluation_uses_running_statistics():
    x = _correlated(3, (8, 4, 4, 5))
    layer = DecorrelatedBatchNorm(momentum=0.9, epsilon=1e-3)
    variables = layer.init(KEY, x, use_running_average=False)
    assert set(variables["batch_stats"]) == {"mean", "whitening", "nonfinite_batches"}
    assert variables["batch_stats"]["nonfinite_batches"] == 0
    np.testing.assert_array_equal(variables["batch_stats"]["whitening"][0], np.eye(5))
    y_train, updates = layer.apply(variables, x, use_running_average=False,
                                   mutable=["batch_stats"])
    stats = updates["batch_stats"]
    flat = np.asarray(x, np.float64).reshape(-1, 5)
    batch_w = np.asarray(meta_layer.inv_sqrtm(
        jnp.asarray(_cov64(x) + 1e-3 * np.eye(5), jnp.float32)))
    np.testing.assert_allclose(stats["mean"], 0.1 * flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["whitening"][0], 0.9 * np.eye(5) + 0.1 * batch_w,
                               rtol=1e-4, atol=1e-5)
    variables = {**variables, "batch_stats": stats}
    y_eval = layer.apply(variables, x, use_running_average=True)
    expected = (flat - np.asarray(stats["mean"])) @ np.asarray(stats["whitening"][0]).T
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 5), expected, rtol=1e-4,
                               atol=1e-4)
    assert not np.allclose(y_eval, y_train, atol=1e-2)  # eval is not batch statistics


def test_zero_momentum_eval_reproduces_training_output():
    x = _correlated(4, (8, 3, 3, 6))
    layer = DecorrelatedBatchNorm(momentum=0.0, epsilon=1e-3)
    variables = layer.init(KEY, x, use_running_average=False)
    y_train, updates = layer.apply(variables, x, use_running_average=False,
                                   mutable=["batch_stats"])
    y_eval = layer.apply({**variables, **updates}, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, y_train, rtol=1e-4, atol=1e-4)


def test_groups_whiten_block_diagonally():
    x = _correlated(5, (16, 3, 3, 6))
    grouped = DecorrelatedBatchNorm(use_running_average=False, epsilon=1e-3, groups=2)
    y, stats, _ = _train_apply(grouped, x)
    assert stats["whitening"].shape == (2, 3, 3)
    single = DecorrelatedBatchNorm(use_running_average=False, epsilon=1e-3)
    for half in (slice(0, 3), slice(3, 6)):
        y_half, _, _ = _train_apply(single, x[..., half])
        np.testing.assert_allclose(y[..., half], y_half, rtol=1e-4, atol=1e-4)
    cov = _cov64(y)
    assert np.abs(cov[:3, 3:]).max() > 0.05  # channels across groups stay correlated


def test_groups_must_divide_channels():
    layer = DecorrelatedBatchNorm(use_running_average=False, groups=4)
    with pytest.raises(ValueError, match="groups"):
        layer.init(KEY, jnp.ones((2, 3, 3, 6)))


def test_affine_parameters_and_bf16_input():
    x = _correlated(6, (8, 3, 3, 4)).astype(jnp.bfloat16)
    layer = DecorrelatedBatchNorm(use_running_average=False)
    y, stats, variables = _train_apply(layer, x)
    assert variables["params"]["scale"].shape == (4,)
    assert variables["params"]["bias"].shape == (4,)
    assert y.dtype == jnp.bfloat16
    assert stats["whitening"].dtype == jnp.float32
    no_affine = DecorrelatedBatchNorm(use_running_average=False, use_scale=False,
                                      use_bias=False)
    assert "params" not in no_affine.init(KEY, x)


@pytest.mark.parametrize("method", meta_layer.METHODS)
def test_every_method_whitens_and_has_finite_gradients(method):
    eps = 1e-2
    x = _rank_deficient(7, batch=2, size=6)[..., :16]
    lam = np.linalg.eigvalsh(_cov64(x))
    layer = DecorrelatedBatchNorm(use_running_average=False, epsilon=eps, method=method)
    variables = layer.init(KEY, x)

    @jax.jit
    def loss(params, x):
        y, _ = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * jnp.cos(y)), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    out = np.linalg.eigvalsh(_cov64(y))
    assert out.max() <= 1.05
    if method.startswith("eigh"):
        np.testing.assert_allclose(out, np.sort(lam / (lam + eps)), atol=2e-3)


def _global_reference(layer, x_global):
    variables = layer.init(KEY, x_global)
    y, updates = layer.apply(variables, x_global, mutable=["batch_stats"])
    return variables, y, updates["batch_stats"]


def test_pmap_axis_name_matches_global_batch():
    assert jax.local_device_count() >= 2
    x = _correlated(8, (8, 4, 4, 6))
    plain = DecorrelatedBatchNorm(use_running_average=False, epsilon=1e-3)
    variables, y_ref, stats_ref = _global_reference(plain, x)
    mapped = DecorrelatedBatchNorm(use_running_average=False, epsilon=1e-3, axis_name="batch")

    def step(v, xs):
        return mapped.apply(v, xs, mutable=["batch_stats"])

    replicated = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
    y, updates = jax.pmap(step, axis_name="batch")(replicated, x.reshape(2, 4, 4, 4, 6))
    np.testing.assert_allclose(y.reshape(x.shape), y_ref, rtol=1e-4, atol=1e-4)
    for name in ("mean", "whitening"):
        for device in range(2):
            np.testing.assert_allclose(updates["batch_stats"][name][device], stats_ref[name],
                                       rtol=1e-4, atol=1e-5)
    # Without axis_name each device would whiten with its own statistics: different.
    y_local, _ = jax.pmap(lambda v, xs: plain.apply(v, xs, mutable=["batch_stats"]))(
        replicated, x.reshape(2, 4, 4, 4, 6))
    assert not np.allclose(y_local.reshape(x.shape), y_ref, atol=1e-2)


def test_jit_with_sharded_batch_matches_unsharded():
    x = _correlated(9, (8, 3, 3, 4))
    layer = DecorrelatedBatchNorm(use_running_average=False, epsilon=1e-3)
    variables, y_ref, stats_ref = _global_reference(layer, x)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    y, updates = jax.jit(lambda v, xs: layer.apply(v, xs, mutable=["batch_stats"]))(
        variables, x_sharded)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["whitening"], stats_ref["whitening"],
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- relative eps


@pytest.mark.parametrize("scale", [1e-3, 0.5, 40.0])
def test_relative_epsilon_makes_the_whitening_scale_free(scale):
    """With eps * trace(Sigma) / d the ridge follows the features: y(c x) = y(x)."""
    x = jax.random.normal(jax.random.key(3), (64, 5)) @ jnp.diag(jnp.arange(1.0, 6.0))
    layer = DecorrelatedBatchNorm(use_running_average=False, epsilon=1e-2,
                                  relative_epsilon=True, use_scale=False, use_bias=False)
    variables = layer.init(jax.random.key(0), x)
    y, _ = layer.apply(variables, x, mutable=["batch_stats"])
    y_scaled, _ = layer.apply(variables, scale * x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_scaled, y, atol=2e-5, rtol=2e-5)
    absolute = layer.clone(relative_epsilon=False)
    z, _ = absolute.apply(variables, x, mutable=["batch_stats"])
    z_scaled, _ = absolute.apply(variables, scale * x, mutable=["batch_stats"])
    if scale != 1.0:  # a fixed eps does not follow the scale (the mechanism of the docs)
        assert float(jnp.abs(z_scaled - z).max()) > 1e-3


def test_relative_epsilon_ridge_is_eps_times_the_mean_eigenvalue():
    from svdcond_jax.nn import whitening

    xg = jax.random.normal(jax.random.key(1), (2, 4, 50))
    _, plain = whitening.group_moments(xg, epsilon=0.0)
    _, ridged = whitening.group_moments(xg, epsilon=0.1, relative_epsilon=True)
    mean_eig = jnp.trace(plain, axis1=-2, axis2=-1) / 4
    np.testing.assert_allclose(ridged - plain, 0.1 * mean_eig[:, None, None] * jnp.eye(4),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="relative_epsilon"):
        DecorrelatedBatchNorm(relative_epsilon="yes")
