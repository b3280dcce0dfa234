"""NOG/OLR with Flax NNX: nnx.Optimizer, Linen-spelled paths, NNX path filters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import filterlib

import svdcond_jax as sc

PATTERN = r"^stem_conv/kernel$"
WD = 5e-4


class Net(nnx.Module):
    """A small CNN from plain flax.nnx layers: conv stem, BN, linear head."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem_conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem_conv(x)))
        return self.head(x.mean(axis=(1, 2)))


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 3)), jnp.float32)
    return x, jnp.arange(8) % 4


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _pure_params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _tx(pre_svd=PATTERN):
    return sc.pre_svd_sgd(0.1, pre_svd, nog=True, olr=True)


def test_mask_spells_paths_as_linen_for_variables_and_bare_arrays():
    model = Net(nnx.Rngs(0))
    wrapped = nnx.state(model, nnx.Param)  # what nnx.Optimizer gives tx.init
    bare = nnx.as_pure(wrapped)  # what it gives tx.update
    expected = {"bn": {"bias": False, "scale": False}, "head": {"bias": False, "kernel": False},
                "stem_conv": {"kernel": True}}
    for tree in (wrapped, bare):
        mask = sc.pre_svd_mask(tree, PATTERN)
        assert nnx.to_pure_dict(mask) == expected
        # one bool per Variable: the mask is a prefix of both trees
        assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(bare)


def test_no_match_lists_paths_in_user_spelling():
    wrapped = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="available paths") as err:
        sc.pre_svd_mask(wrapped, r"^stem/kernel$")
    assert "'stem_conv/kernel'" in str(err.value) and "/value" not in str(err.value)


def _one_nnx_step(selection):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _tx(selection), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(_loss)(model, *_data()))
    return _pure_params(model), sc.find_olr_eta(optimizer.opt_state)


@pytest.mark.parametrize("selection", [
    nnx.PathContains("stem_conv"),
    nnx.All(nnx.PathContains("stem_conv"), nnx.PathContains("kernel")),
    nnx.Not(nnx.Any(nnx.PathContains("bn"), nnx.PathContains("head"))),
    filterlib.PathIn(("stem_conv", "kernel")),
    lambda path, leaf: leaf.ndim == 4,
], ids=["PathContains", "All", "Not-Any", "PathIn", "callable"])
def test_selection_forms_agree_under_nnx_optimizer(selection):
    """Each form selects the stem kernel alone: the same step as the regex."""
    mask = sc.pre_svd_mask(nnx.state(Net(nnx.Rngs(0)), nnx.Param), selection)
    assert mask == sc.pre_svd_mask(nnx.state(Net(nnx.Rngs(0)), nnx.Param), PATTERN)
    params, eta = _one_nnx_step(selection)
    expected, expected_eta = _one_nnx_step(PATTERN)
    assert float(eta) > 0
    np.testing.assert_allclose(eta, expected_eta, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           params, expected)


def test_bool_pytree_selection_under_nnx_optimizer():
    model = Net(nnx.Rngs(0))
    mask = sc.pre_svd_mask(nnx.as_pure(nnx.state(model, nnx.Param)), PATTERN)
    optimizer = nnx.Optimizer(model, _tx(mask), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(_loss)(model, *_data()))
    assert float(sc.find_olr_eta(optimizer.opt_state)) > 0


@pytest.mark.parametrize("selection", [
    nnx.Param, nnx.OfType(nnx.Param), nnx.All(nnx.PathContains("stem_conv"), nnx.Param),
    nnx.Not(nnx.BatchStat), nnx.WithTag("pre_svd"),
], ids=["Param", "OfType", "All-with-type", "Not-type", "WithTag"])
def test_type_and_tag_filters_raise(selection):
    """nnx.Optimizer hands tx.update bare arrays: a type/tag filter cannot select there."""
    model = Net(nnx.Rngs(0))
    with pytest.raises(TypeError, match="select by path"):
        _tx(selection)
    with pytest.raises(TypeError, match="select by path"):
        sc.pre_svd_mask(nnx.state(model, nnx.Param), selection)


def _polar_f64(g):
    m = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return (u @ vt).reshape(g.shape)


def test_nog_olr_on_one_conv_kernel_via_nnx_optimizer():
    """The composed pieces under nnx.Optimizer: the stem kernel's first step is
    -eta (polar(g) + wd w) with eta from Eqs. 20-21; every other parameter gets SGD."""
    model = Net(nnx.Rngs(1))
    lr = 0.1
    tx = optax.partition(
        {"pre_svd": optax.chain(sc.nearest_orthogonal_gradient(),
                                sc.optimal_learning_rate(lr, momentum=0.9, weight_decay=WD)),
         "other": optax.chain(optax.add_decayed_weights(WD), optax.sgd(lr, momentum=0.9))},
        sc.pre_svd_labels(PATTERN))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = _pure_params(model)
    nnx_grads = nnx.grad(_loss)(model, *_data())
    grads = nnx.to_pure_dict(nnx.state(nnx_grads, nnx.Param))
    optimizer.update(model, nnx_grads)
    after = _pure_params(model)

    w = np.asarray(before["stem_conv"]["kernel"], np.float64)
    r = _polar_f64(grads["stem_conv"]["kernel"])
    wv, lv = w.ravel(), r.ravel()
    e = (wv @ wv) * (lv @ wv) / ((wv @ wv) * (lv @ lv) + 2 * (lv @ wv) ** 2)
    eta = e if 0 < e < lr else lr
    np.testing.assert_allclose(float(sc.find_olr_eta(optimizer.opt_state)), eta, rtol=1e-4)
    np.testing.assert_allclose(after["stem_conv"]["kernel"], w - eta * (r + WD * w),
                               rtol=1e-4, atol=1e-6)
    g_head = np.asarray(grads["head"]["kernel"], np.float64)
    w_head = np.asarray(before["head"]["kernel"], np.float64)
    np.testing.assert_allclose(after["head"]["kernel"], w_head - lr * (g_head + WD * w_head),
                               rtol=1e-4, atol=1e-6)


def test_nnx_trajectory_equals_linen_pytree_trajectory():
    """nnx.Optimizer and the plain-pytree path (the Linen way) take the same steps."""
    model = Net(nnx.Rngs(2))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    params = _pure_params(model)  # a Linen-style nested dict of arrays
    tx = _tx()
    state = tx.init(params)
    update = jax.jit(tx.update)
    x, y = _data()
    for _ in range(4):
        grads = nnx.grad(_loss)(model, x, y)
        pure_grads = nnx.to_pure_dict(nnx.state(grads, nnx.Param))
        updates, state = update(pure_grads, state, params)
        params = optax.apply_updates(params, updates)
        optimizer.update(model, grads)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            _pure_params(model), params)
        np.testing.assert_allclose(sc.find_olr_eta(optimizer.opt_state), sc.find_olr_eta(state),
                                   rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: sc.pre_svd_optimizer(0.1, PATTERN, rest=optax.adamw(1e-3)),
    lambda: sc.nog_optimizer(0.1, olr=True),
    lambda: sc.nog_optimizer(0.02, conventions="muon"),
], ids=["pre_svd_optimizer(adamw)", "nog_optimizer(olr)", "nog_optimizer(muon)"])
def test_recipes_under_nnx_optimizer_equal_the_pytree_path(make):
    """The NNX model's kernels are selected by the same paths (head/kernel excluded by the
    default), and nnx.Optimizer takes the same steps as the plain pytree optimizer."""
    model = Net(nnx.Rngs(3))
    optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
    params = _pure_params(model)
    tx = make()
    state = tx.init(params)
    x, y = _data()
    for _ in range(2):
        grads = nnx.grad(_loss)(model, x, y)
        updates, state = tx.update(nnx.to_pure_dict(nnx.state(grads, nnx.Param)), state, params)
        params = optax.apply_updates(params, updates)
        optimizer.update(model, grads)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            _pure_params(model), params)
    assert sc.nog_labels()(params)["head"]["kernel"] == "rest"
