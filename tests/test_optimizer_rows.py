"""The optimizer rows of experiments/configs/digits_optimizers*.py: config fields, validation,
and a few finite training steps per row."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from svdcond_jax.optimizers import find_olr_eta
from svdcond_jax.training import methods, steps
from svdcond_jax.training import state as state_lib
from svdcond_jax.training.config import get_config, load_config_file, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
DBN = load_config_file(CONFIGS / "digits_optimizers.py")
GCP = load_config_file(CONFIGS / "digits_optimizers_gcp.py")


def test_rows_name_the_six_optimizers():
    rows = {m: methods.parse_method(m) for m in DBN.METHODS}
    config = get_config()
    got = {m: methods.resolve_optimizer(s, config.optimizer) for m, s in rows.items()}
    assert got == {"svd": "sgd", "svd@adamw": "adamw", "svd@muon": "muon", "svd@nog": "nog",
                   "svd@nog+olr": "nog+olr", "svd+nog+olr@adamw": "adamw"}
    assert rows["svd+nog+olr@adamw"].nog and rows["svd+nog+olr@adamw"].olr
    assert GCP.METHODS == DBN.METHODS and GCP.get_config().task == "gcp"


@pytest.mark.parametrize("field,value,message", [
    ("method", "svd@lion", r"optionally followed by @<optimizer> \(sgd, adamw"),
    ("method", "svd+nog@muon", r"muon already orthogonalises every kernel.*svd@muon"),
    ("method", "svd+olr@nog+olr", r"drop \+nog/\+olr \(svd@nog\+olr\)"),
    ("optimizer", "lion", "config.optimizer='lion': must be one of sgd, adamw, muon"),
    ("adamw_learning_rate", 0.0, "config.adamw_learning_rate=0.0: must be a finite number > 0"),
    ("muon_weight_decay", -1.0, "config.muon_weight_decay=-1.0: must be a finite number >= 0"),
    ("polar_method", "qr", "config.polar_method='qr': must be one of svd, newton_schulz"),
])
def test_bad_optimizer_fields_are_refused(field, value, message):
    config = get_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_config_optimizer_applies_to_rows_without_suffix():
    config = get_config()
    config.optimizer, config.method = "nog+olr", "svd+nog"
    with pytest.raises(ValueError, match="nog\\+olr already orthogonalises"):
        validate_config(config)
    config.method = "svd"
    validate_config(config)
    setup = state_lib.create_setup(config, num_classes=10, steps_per_epoch=4)
    assert methods.resolve_optimizer(setup.spec, config.optimizer) == "nog+olr"


def _batches(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(n)]


BASE_RATE = {"svd": "learning_rate", "svd@adamw": "adamw_learning_rate",
             "svd@muon": "muon_learning_rate", "svd@nog": "learning_rate",
             "svd@nog+olr": "learning_rate", "svd+nog+olr@adamw": "adamw_learning_rate"}


# End to end for the rows whose optimizer differs most from the paper's SGD (which the
# training tests cover); the other rows' optimizers are stepped below (every row for GCP).
END_TO_END = ("svd@muon", "svd@nog+olr", "svd+nog+olr@adamw")

@pytest.mark.parametrize("row", END_TO_END)
def test_rows_train_a_few_steps_finitely(row):
    """Decorrelated-BN digits (quick config): three jitted train steps, nothing skipped,
    every parameter finite and moved, the injected rate the row's own."""
    config = DBN.get_config("runlocal")
    config.method = row
    validate_config(config)
    setup = state_lib.create_setup(config, num_classes=10, steps_per_epoch=3)
    host = state_lib.create_train_state(jax.random.key(0, impl=config.prng_impl), setup,
                                        (8, 8, 3))
    par = steps.make_parallel("jit", ol_coeff=0.0, ol_pattern=None,
                              capture_stem=not setup.spec.uses_svd)
    state = par.place_state(host)
    for batch in _batches(3):
        state, metrics = par.train_step(state, par.place_batch(batch))
    final = jax.device_get(par.host_state(state))
    assert int(final.svd_failures) == 0 and par.host(metrics)["finite"] == 1.0
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(host.params), jax.tree_util.tree_leaves(final.params),
        strict=True)]
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(final.params))
    assert all(moved), row
    np.testing.assert_allclose(float(state_lib.learning_rate(final.opt_state)),
                               config[BASE_RATE[row]], rtol=1e-6)
    eta = find_olr_eta(final.opt_state)
    assert (eta is not None) == ("olr" in row)
    if eta is not None:
        assert np.all((np.asarray(eta) > 0) & (np.asarray(eta) <= config.learning_rate * 1.001))


@pytest.mark.parametrize("module", [DBN, GCP], ids=["dbn", "gcp"])
def test_each_rows_optimizer_steps_the_model_finitely(module):
    """The rows' optimizers (those not trained end to end above, every row for GCP) on the
    task model's parameters, two jitted steps with random gradients: finite, every
    parameter moved (GCP: the Pre-SVD 1x1 conv under head/ is a matrix for muon and nog,
    fc is not)."""
    config = module.get_config("runlocal")
    setup = state_lib.create_setup(config, num_classes=10, steps_per_epoch=3)
    params = state_lib.create_train_state(jax.random.key(0, impl=config.prng_impl), setup,
                                          (8, 8, 3)).params
    dims = state_lib.muon_dimension_numbers(params)
    assert dims["fc"]["kernel"] is None and dims["stem_conv"]["kernel"] is not None
    if module is GCP:
        assert dims["head"]["pre_svd_conv"]["kernel"] is not None
    rng = np.random.default_rng(1)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                                    params) for _ in range(2)]
    rows = [r for r in module.METHODS if module is GCP or r not in END_TO_END]
    for row in rows:
        config.method = row
        validate_config(config)
        spec = methods.parse_method(row)
        lr_fn = state_lib.create_learning_rate_fn(config, 3)
        tx = state_lib.create_optimizer(config, spec, lr_fn, setup.pre_svd_pattern)
        opt_state, p = tx.init(params), params
        update = jax.jit(tx.update)
        for g in grads:
            updates, opt_state = update(g, opt_state, p)
            p = optax.apply_updates(p, updates)
        for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(params),
                        strict=True):
            assert np.all(np.isfinite(a)) and not np.array_equal(a, b), row
