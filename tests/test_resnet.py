"""Tests for the ResNet family: parameter counts, every configuration, Pre-SVD paths."""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdcond_jax.models import (
    CifarResNet18,
    CifarResNet50,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    TinyResNet,
    pre_svd_eps,
    pre_svd_features,
    pre_svd_pattern,
)

KEY = jax.random.key(0, impl="rbg")  # rbg: compiles much faster than threefry on CPU
# A low-precision output is the float32 result rounded once: within eps(dtype) relative,
# plus float32 round-off (two differently compiled programs) relative to the output scale.
_ROUNDOFF = 1e-5


def _param_paths(params) -> dict[str, jax.Array]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def _abstract_variables(model, image_size: int):
    x = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(lambda: model.init(KEY, x, train=False))


def _abstract_intermediates(model, variables, image_size: int):
    x = jnp.zeros((1, image_size, image_size, 3))
    _, state = jax.eval_shape(lambda v: model.apply(
        v, x, train=True, mutable=["batch_stats", "intermediates"]), variables)
    return state["intermediates"]


@pytest.mark.parametrize("factory,expected", [(ResNet18, 11_689_512), (ResNet34, 21_797_672),
                                              (ResNet50, 25_557_032)])
def test_imagenet_parameter_counts_match_torchvision(factory, expected):
    variables = _abstract_variables(factory(num_classes=1000), 224)
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == expected
    assert set(variables) == {"params", "batch_stats"}


def test_gcp_resnet18_has_a_7x7_map_and_32896_features_at_224px():
    model = ResNet18(num_classes=1000, head="gcp")
    variables = _abstract_variables(model, 224)
    assert variables["params"]["fc"]["kernel"].shape == (32896, 1000)
    assert variables["params"]["head"]["pre_svd_conv"]["kernel"].shape == (1, 1, 512, 256)
    sown = pre_svd_features(_abstract_intermediates(model, variables, 224))
    assert sown.shape == (1, 7, 7, 256)


def test_cifar_resnet50_dbn_stem_is_3x3_stride_1_without_max_pool():
    model = CifarResNet50(num_classes=100, stem_norm="dbn")
    variables = _abstract_variables(model, 32)
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
    assert variables["batch_stats"]["stem_norm"]["whitening"].shape == (1, 64, 64)
    sown = pre_svd_features(_abstract_intermediates(model, variables, 32))
    assert sown.shape == (1, 32, 32, 64)
    assert CifarResNet18(num_classes=10).stem == "cifar"


@pytest.mark.parametrize("factory,kwargs,match", [
    (TinyResNet, {"stem_norm": "dbn", "head": "gcp"}, "two SVD"),
    (TinyResNet, {"pre_svd": "sn"}, "needs an SVD"),
    (TinyResNet, {"head": "gcp", "pre_svd": "ol"}, "pre_svd"),
    (TinyResNet, {"stem": "mnist"}, "stem"),
    (TinyResNet, {"stem_norm": "gn"}, "stem_norm"),
    (TinyResNet, {"head": "gmp"}, "head"),
    (ResNet18, {"stem_norm": "dbn", "pre_svd": "ow"}, "stride"),
])
def test_invalid_configurations_raise_at_construction(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(num_classes=3, **kwargs)


@pytest.mark.parametrize("factory", [ResNet18, ResNet34, ResNet50, CifarResNet18,
                                     CifarResNet50, TinyResNet])
def test_factories_are_documented_functions(factory):
    assert inspect.isfunction(factory)  # not a functools.partial: help() shows its own doc
    doc = inspect.getdoc(factory)
    for section in ("Args:", "Returns:", "Raises:", "Example:"):
        assert section in doc
    assert isinstance(factory(num_classes=3), ResNet)
    with pytest.raises(TypeError, match="stage_sizes"):
        factory(num_classes=3, stage_sizes=(1,))


def test_tiny_resnet_num_filters_default_can_be_overridden():
    assert TinyResNet(num_classes=3).num_filters == 8
    assert TinyResNet(num_classes=3, num_filters=4).num_filters == 4


@pytest.mark.parametrize("image_dtype,model_dtype,logits_dtype", [
    (jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float16, None, jnp.float16),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, None, jnp.float32),
])
def test_logits_dtype(image_dtype, model_dtype, logits_dtype):
    model = TinyResNet(num_classes=3, stem_norm="dbn", pre_svd="ow", dtype=model_dtype)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 3)), image_dtype)
    variables = jax.eval_shape(lambda: model.init(KEY, x, train=False))
    assert variables["params"]["stem_conv"]["kernel"].dtype == jnp.float32
    assert variables["batch_stats"]["stem_norm"]["whitening"].dtype == jnp.float32
    logits, _ = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    assert logits.dtype == logits_dtype


def test_bfloat16_images_give_the_float32_logits_rounded():
    """dtype=None computes in float32 for bfloat16 images and rounds the logits once."""
    model = TinyResNet(num_classes=3, head="gcp", pre_svd="sn", gcp_dim=4)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 6, 3)), jnp.bfloat16)
    run = jax.jit(lambda x: model.apply(model.init(KEY, x, train=False), x, train=False))
    low, ref = run(x), run(x.astype(jnp.float32))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ref,
                               rtol=float(jnp.finfo(jnp.bfloat16).eps),
                               atol=_ROUNDOFF * float(np.abs(ref).max()))


def test_plain_resnet_has_no_pre_svd_layer():
    model = TinyResNet(num_classes=3)
    with pytest.raises(ValueError, match="no SVD meta-layer"):
        pre_svd_pattern(model)
    with pytest.raises(ValueError, match="no SVD meta-layer"):
        pre_svd_eps(model)


@pytest.mark.parametrize("pre_svd", ["none", "sn"])
def test_imagenet_dbn_stem_is_the_pre_svd_layer(pre_svd):
    model = ResNet18(num_classes=10, stem_norm="dbn", pre_svd=pre_svd, dbn_eps=1e-3)
    paths = _param_paths(_abstract_variables(model, 32)["params"])
    matched = [p for p in paths if re.search(pre_svd_pattern(model), p)]
    assert matched == ["stem_conv/kernel"]
    assert paths["stem_conv/kernel"].shape == (7, 7, 3, 64)
    assert pre_svd_eps(model) == 1e-3


CONFIGS = [  # stem_norm x head x pre_svd, three meta-layer methods
    ("bn", "gap", "none", "eigh"),
    ("dbn", "gap", "none", "eigh"),
    ("dbn", "gap", "sn", "eigh"),
    ("dbn", "gap", "ow", "pade"),
    ("bn", "gcp", "none", "eigh"),
    ("bn", "gcp", "sn", "newton_schulz"),
    ("bn", "gcp", "ow", "eigh"),
]


@pytest.mark.parametrize("stem_norm,head,pre_svd,method", CONFIGS)
def test_tiny_configuration_trains_evaluates_and_differentiates(stem_norm, head, pre_svd,
                                                                method):
    model = TinyResNet(num_classes=5, stem_norm=stem_norm, head=head, pre_svd=pre_svd,
                       meta_method=method, gcp_dim=16)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8, 8, 3)), jnp.float32)
    labels = jnp.arange(4) % 5

    @jax.jit
    def run(x):
        variables = model.init(KEY, x, train=False)

        def loss_fn(params):
            logits, state = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats", "intermediates"])
            loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
            return loss, state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        eval_vars = {**variables, "batch_stats": state["batch_stats"]}
        eval_logits = model.apply(eval_vars, x, train=False)
        return variables, loss, grads, state, eval_logits

    variables, loss, grads, state, eval_logits = run(x)
    assert np.isfinite(float(loss))
    assert eval_logits.shape == (4, 5)
    assert np.all(np.isfinite(np.asarray(eval_logits)))
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                           state["batch_stats"])
    stem = dict(changed["stem_norm"])
    # Running stats were updated; a clean batch leaves the non-finite counter (DBN) at 0.
    assert stem.pop("nonfinite_batches", False) is False and stem and all(stem.values())

    paths = _param_paths(variables["params"])
    if stem_norm == "bn" and head == "gap":
        assert "pre_svd_features" not in str(state.get("intermediates", {}))
        return
    pattern = pre_svd_pattern(model)
    matched = [p for p in paths if re.search(pattern, p)]
    expected = "stem_conv/kernel" if stem_norm == "dbn" else "head/pre_svd_conv/kernel"
    assert matched == [expected]
    assert np.abs(np.asarray(_param_paths(grads)[expected])).max() > 0.0
    sown = pre_svd_features(state["intermediates"])
    assert sown.shape == ((4, 8, 8, 8) if stem_norm == "dbn" else (4, 4, 4, 16))
    assert pre_svd_eps(model) == (1e-2 if stem_norm == "dbn" else 0.0)


@pytest.mark.parametrize("stem_norm,head,pre_svd", [("dbn", "gap", "sn"), ("dbn", "gap", "ow"),
                                                    ("bn", "gcp", "sn"), ("bn", "gcp", "ow")])
def test_zero_pre_svd_kernel_trains_finitely(stem_norm, head, pre_svd):
    """svd+sn / svd+ow from a zero Pre-SVD kernel: every SGD step stays finite.

    (With "sn" the zero conv output is normalised to exactly 0 and the ReLU after it has
    gradient 0 there, so in the whole network the kernel stays 0; the layer itself passes an
    identity gradient, see test_orthogonal_layers.py. With "ow" exp(0) = I keeps it alive.)
    """
    model = TinyResNet(num_classes=3, stem_norm=stem_norm, head=head, pre_svd=pre_svd,
                       gcp_dim=4)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 6, 6, 3)), jnp.float32)
    labels = jnp.arange(4) % 3
    variables = jax.jit(lambda x: model.init(KEY, x, train=False))(x)
    path = "stem_conv" if stem_norm == "dbn" else "head/pre_svd_conv"

    def zero(path_keys, leaf):
        return jnp.zeros_like(leaf) if "/".join(k.key for k in path_keys) == f"{path}/kernel" \
            else leaf

    params = jax.tree_util.tree_map_with_path(zero, variables["params"])

    @jax.jit
    def step(params, batch_stats):
        def loss_fn(params):
            logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                        train=True, mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return params, state["batch_stats"], loss, grads

    batch_stats = variables["batch_stats"]
    for _ in range(3):
        params, batch_stats, loss, grads = step(params, batch_stats)
        for leaf in [loss, *jax.tree.leaves(grads), *jax.tree.leaves(params),
                     *jax.tree.leaves(batch_stats)]:
            assert np.all(np.isfinite(np.asarray(leaf)))
    if pre_svd == "ow":
        assert float(jnp.abs(_param_paths(params)[f"{path}/kernel"]).max()) > 0
