"""Every documented way to compose NOG and OLR descends; the old trap cannot be built.

The convex problem: least squares in the Pre-SVD kernel (a 3x3x3x16 conv kernel seen as a
27 x 16 matrix) plus a quadratic in a second, "other" parameter.
"""

import doctest
import operator
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import svdcond_jax as sc

PATTERN = r"^stem_conv/kernel$"
LR, WD, MOMENTUM = 0.1, 5e-4, 0.9
STEPS = 40


def _problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 27)), jnp.float32)
    w_true = rng.normal(size=(27, 16)) / np.sqrt(27)
    y = jnp.asarray(x @ w_true + 0.05 * rng.normal(size=(128, 16)), jnp.float32)
    params = {
        "stem_conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 16)) / np.sqrt(27),
                                            jnp.float32)},
        "head": {"kernel": jnp.asarray(0.1 * rng.normal(size=(16, 4)), jnp.float32)},
    }

    def loss(p):
        w = p["stem_conv"]["kernel"].reshape(27, 16)
        return (0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, -1))
                + 0.5 * jnp.sum(p["head"]["kernel"] ** 2))

    return params, loss


def _mask(params):
    return sc.pre_svd_mask(params, PATTERN)


def _not_mask(params):
    return jax.tree_util.tree_map(operator.not_, sc.pre_svd_mask(params, PATTERN))


def _other():
    return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


def _olr(**kw):
    return sc.optimal_learning_rate(LR, momentum=MOMENTUM, weight_decay=WD, **kw)


COMPOSITIONS = {
    "partition(NOG + OLR)": lambda: optax.partition(
        {"pre_svd": optax.chain(sc.nearest_orthogonal_gradient(), _olr()), "other": _other()},
        sc.pre_svd_labels(PATTERN)),
    "partition(OLR)": lambda: optax.partition(
        {"pre_svd": _olr(), "other": _other()}, sc.pre_svd_labels(PATTERN)),
    "partition(NOG + OLR nesterov)": lambda: optax.partition(
        {"pre_svd": optax.chain(sc.nearest_orthogonal_gradient(), _olr(nesterov=True)),
         "other": _other()}, sc.pre_svd_labels(PATTERN)),
    "partition(NOG newton_schulz + OLR schedule)": lambda: optax.partition(
        {"pre_svd": optax.chain(
            sc.nearest_orthogonal_gradient(method="newton_schulz"),
            sc.optimal_learning_rate(optax.cosine_decay_schedule(LR, STEPS), momentum=MOMENTUM,
                                     weight_decay=WD)),
         "other": _other()}, sc.pre_svd_labels(PATTERN)),
    "masked(NOG + OLR) + masked(sgd)": lambda: optax.chain(
        optax.masked(optax.chain(sc.nearest_orthogonal_gradient(), _olr()), _mask),
        optax.masked(_other(), _not_mask)),
    "partition(inject_hyperparams(OLR))": lambda: optax.partition(
        {"pre_svd": optax.chain(
            sc.nearest_orthogonal_gradient(),
            optax.inject_hyperparams(sc.optimal_learning_rate)(
                learning_rate=LR, momentum=MOMENTUM, weight_decay=WD)),
         "other": _other()}, sc.pre_svd_labels(PATTERN)),
    "partition(inject_hyperparams(OLR schedule))": lambda: optax.partition(
        {"pre_svd": optax.inject_hyperparams(sc.optimal_learning_rate)(
            learning_rate=optax.exponential_decay(LR, 10, 0.5), momentum=MOMENTUM),
         "other": _other()}, sc.pre_svd_labels(PATTERN)),
    "pre_svd_sgd(nog, olr)": lambda: sc.pre_svd_sgd(LR, PATTERN, nog=True, olr=True),
    "pre_svd_sgd(olr)": lambda: sc.pre_svd_sgd(LR, PATTERN, olr=True),
    "pre_svd_sgd(nog)": lambda: sc.pre_svd_sgd(LR, PATTERN, nog=True),
    "pre_svd_sgd()": lambda: sc.pre_svd_sgd(LR, PATTERN),
    "apply_if_finite(pre_svd_sgd(nog, olr))": lambda: optax.apply_if_finite(
        sc.pre_svd_sgd(optax.cosine_decay_schedule(LR, STEPS), PATTERN, nog=True, olr=True), 3),
    "inject_hyperparams(pre_svd_sgd(nog, olr))": lambda: optax.inject_hyperparams(
        sc.pre_svd_sgd, static_args=("pre_svd",))(
            learning_rate=LR, pre_svd=PATTERN, nog=True, olr=True),
    "pre_svd_optimizer(nog, olr, rest=adamw)": lambda: sc.pre_svd_optimizer(
        LR, PATTERN, rest=optax.adamw(1e-2)),
    "pre_svd_optimizer(nog, rest=adamw)": lambda: sc.pre_svd_optimizer(
        LR, PATTERN, rest=optax.adamw(1e-2), olr=False),
    "pre_svd_optimizer(olr schedule, nesterov, rest=adamw schedule)": lambda: (
        sc.pre_svd_optimizer(optax.cosine_decay_schedule(LR, STEPS), PATTERN, nesterov=True,
                             rest=optax.adamw(optax.cosine_decay_schedule(1e-2, STEPS)))),
    "nog_optimizer(paper)": lambda: sc.nog_optimizer(LR),
    "nog_optimizer(paper, olr)": lambda: sc.nog_optimizer(LR, olr=True),
    "nog_optimizer(muon)": lambda: sc.nog_optimizer(0.02, conventions="muon"),
    "nog_optimizer(muon, olr)": lambda: sc.nog_optimizer(LR, conventions="muon", olr=True),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_composition_descends_on_convex_problem(name):
    params, loss = _problem()
    tx = COMPOSITIONS[name]()
    state = tx.init(params)
    update = jax.jit(tx.update)
    loss0 = float(loss(params))
    for t in range(STEPS):
        grads = jax.grad(loss)(params)
        updates, state = update(grads, state, params)
        if t == 0:  # the first step is a descent direction for every parameter
            for u, g in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(grads),
                            strict=True):
                cos = float(jnp.vdot(u, g) / (jnp.linalg.norm(u) * jnp.linalg.norm(g)))
                assert cos < -0.1, f"{name}: first step is not a descent direction, cos={cos}"
        params = optax.apply_updates(params, updates)
    # NOG's step has a fixed size (eta times the kernel's rank), so with a constant rate the
    # loss stalls near the optimum at a level set by lr; 40 steps reach < 0.11 loss0 for all.
    assert float(loss(params)) < 0.25 * loss0, name
    if "olr" in name.lower():
        eta = sc.find_olr_eta(state)
        assert eta is not None and 0 < float(eta) <= LR * (1 + 1e-6)  # float32(0.1) > 0.1


def test_old_trap_cannot_be_built():
    """OLR wrapping optax.sgd negated twice and ascended; inner= now raises."""
    with pytest.raises(TypeError, match="inner= was removed"):
        sc.optimal_learning_rate(LR, inner=optax.sgd(LR, momentum=MOMENTUM))
    with pytest.raises(TypeError, match="learning_rate"):
        sc.optimal_learning_rate(optax.sgd(LR))  # a transformation where the rate goes


def test_olr_step_is_minus_eta_times_sgd_direction():
    """The OLR update of the Pre-SVD kernel is parallel to optax.sgd's, scaled by eta / lr."""
    params, loss = _problem()
    grads = jax.grad(loss)(params)
    pre = {"k": params["stem_conv"]["kernel"]}
    g = {"k": grads["stem_conv"]["kernel"]}
    olr = sc.optimal_learning_rate(LR, momentum=MOMENTUM, weight_decay=WD)
    sgd = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
    u_olr, state = olr.update(g, olr.init(pre), pre)
    u_sgd, _ = sgd.update(g, sgd.init(pre), pre)
    eta = float(state.eta["k"])
    np.testing.assert_allclose(u_olr["k"], eta / LR * u_sgd["k"], rtol=1e-5, atol=1e-8)


def test_docs_nog_olr_examples_run():
    """The examples in docs/nog_olr.md are doctests."""
    path = pathlib.Path(__file__).parents[1] / "docs" / "nog_olr.md"
    result = doctest.testfile(str(path), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0, result


# ------------------------------------------------------- any optimizer for the rest


def test_pre_svd_optimizer_next_to_adamw_takes_both_steps():
    """First step: the Pre-SVD kernel moves by -eta (polar(g) + wd w) with eta from
    Eqs. 20-21 (cap = the SGD rate given), every other parameter exactly by AdamW."""
    params, loss = _problem()
    grads = jax.grad(loss)(params)
    adamw = optax.adamw(1e-3, weight_decay=1e-4)
    tx = sc.pre_svd_optimizer(LR, PATTERN, rest=adamw, momentum=MOMENTUM, weight_decay=WD)
    updates, state = tx.update(grads, tx.init(params), params)
    head = {"head": params["head"]}
    expected_head, _ = adamw.update({"head": grads["head"]}, adamw.init(head), head)
    np.testing.assert_allclose(updates["head"]["kernel"], expected_head["head"]["kernel"],
                               rtol=1e-6)
    w = np.asarray(params["stem_conv"]["kernel"], np.float64)
    g = np.asarray(grads["stem_conv"]["kernel"], np.float64).reshape(27, 16)
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    r = (u @ vt).reshape(w.shape)
    e = (w.ravel() @ w.ravel()) * (r.ravel() @ w.ravel()) / (
        (w.ravel() @ w.ravel()) * (r.ravel() @ r.ravel()) + 2 * (r.ravel() @ w.ravel()) ** 2)
    eta = e if 0 < e < LR else LR
    np.testing.assert_allclose(float(sc.find_olr_eta(state)), eta, rtol=1e-5)
    np.testing.assert_allclose(updates["stem_conv"]["kernel"], -eta * (r + WD * w),
                               rtol=1e-4, atol=1e-7)


def test_pre_svd_optimizer_without_nog_and_olr_is_rest():
    params, loss = _problem()
    grads = jax.grad(loss)(params)
    rest = optax.adamw(1e-3)
    tx = sc.pre_svd_optimizer(LR, PATTERN, rest=rest, nog=False, olr=False)
    got, _ = tx.update(grads, tx.init(params), params)
    expected, _ = rest.update(grads, rest.init(params), params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got,
                           expected)


def test_multisteps_accumulates_the_raw_gradient_before_nog_and_olr():
    """optax.MultiSteps(k=2) around the whole optimizer: nothing moves on the first
    micro-batch; then one step of NOG + OLR on the MEAN of the two gradients (not the mean
    of two polar factors), the same as the optimizer without accumulation would take."""
    params, loss = _problem()
    g1 = jax.grad(loss)(params)
    g2 = jax.tree_util.tree_map(lambda g: 0.5 * g + 0.01, g1)
    inner = lambda: sc.pre_svd_optimizer(LR, PATTERN, rest=optax.adamw(1e-3))  # noqa: E731
    acc = optax.MultiSteps(inner(), every_k_schedule=2)
    state = acc.init(params)
    u1, state = acc.update(g1, state, params)
    jax.tree_util.tree_map(lambda u: np.testing.assert_array_equal(u, 0.0), u1)
    u2, state = acc.update(g2, state, params)
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
    plain = inner()
    expected, plain_state = plain.update(mean, plain.init(params), params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                           u2, expected)
    np.testing.assert_allclose(sc.find_olr_eta(state), sc.find_olr_eta(plain_state), rtol=1e-6)
    sc.check_olr_placement(acc)


_OLR = sc.optimal_learning_rate(LR, momentum=MOMENTUM)
SCALED_BEFORE_OLR = {
    "chain(scale_by_adam, OLR)": lambda: optax.chain(optax.scale_by_adam(), _OLR),
    "chain(sgd, OLR)": lambda: optax.chain(optax.sgd(LR), _OLR),
    "chain(sgd momentum, OLR)": lambda: optax.chain(optax.sgd(LR, momentum=0.9), _OLR),
    "chain(scale_by_learning_rate, OLR)": lambda: optax.chain(
        optax.scale_by_learning_rate(LR), _OLR),
    "chain(adamw, NOG, OLR)": lambda: optax.chain(optax.adamw(1e-3),
                                                  sc.nearest_orthogonal_gradient(), _OLR),
    "chain(OLR, OLR)": lambda: optax.chain(_OLR, _OLR),
    "partition(chain(adam, OLR))": lambda: optax.partition(
        {"pre_svd": optax.chain(optax.adam(1e-3), _OLR), "other": _other()},
        sc.pre_svd_labels(PATTERN)),
    "masked(chain(scale_by_adam, chain(NOG, OLR)))": lambda: optax.masked(
        optax.chain(optax.scale_by_adam(), optax.chain(sc.nearest_orthogonal_gradient(), _OLR)),
        _mask),
    "MultiSteps(chain(scale_by_adam, OLR))": lambda: optax.MultiSteps(
        optax.chain(optax.scale_by_adam(), _OLR), 2),
    "apply_if_finite(chain(scale, OLR))": lambda: optax.apply_if_finite(
        optax.chain(optax.scale(-1.0), _OLR), 3),
    "chain(scale_by_adam, inject_hyperparams(OLR))": lambda: optax.chain(
        optax.scale_by_adam(), optax.inject_hyperparams(sc.optimal_learning_rate)(
            learning_rate=optax.cosine_decay_schedule(LR, 10))),
    "chain(inject_hyperparams(sgd), OLR)": lambda: optax.chain(
        optax.inject_hyperparams(optax.sgd)(learning_rate=LR), _OLR),
    "named_chain(adam, OLR)": lambda: optax.named_chain(("adam", optax.scale_by_adam()),
                                                        ("olr", _OLR)),
}


@pytest.mark.parametrize("name", list(SCALED_BEFORE_OLR))
def test_olr_after_a_scaling_transform_is_refused(name):
    tx = SCALED_BEFORE_OLR[name]()
    with pytest.raises(ValueError, match=r"optimal_learning_rate \(.*\) is fed an update "
                                         r"already scaled by"):
        sc.check_olr_placement(tx)
    if isinstance(tx, optax.MultiSteps):
        tx = tx.gradient_transformation()
    with pytest.raises(ValueError, match="already scaled by"):  # at construction
        sc.pre_svd_optimizer(LR, PATTERN, rest=tx)


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_documented_compositions_pass_the_placement_check(name):
    tx = COMPOSITIONS[name]()
    assert sc.check_olr_placement(tx) is tx


def test_placement_check_passes_gradient_preprocessing_and_the_rest():
    for tx in (optax.chain(optax.clip_by_global_norm(1.0), _OLR),
               optax.chain(optax.add_decayed_weights(WD), sc.nearest_orthogonal_gradient(),
                           _OLR),
               optax.chain(sc.ema_momentum(0.9), sc.nearest_orthogonal_gradient(), _OLR),
               optax.contrib.muon(0.02), optax.adamw(1e-3)):
        sc.check_olr_placement(tx)
    with pytest.raises(TypeError, match="GradientTransformation"):
        sc.check_olr_placement(lambda g: g)
    with pytest.raises(TypeError, match="rest must be an optax.GradientTransformation"):
        sc.pre_svd_optimizer(LR, PATTERN, rest=None)
