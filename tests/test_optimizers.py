"""pre_svd_sgd against the float64 reference vectors and a float64 NumPy emulation."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from svdcond_jax.optimizers import find_olr_eta, pre_svd_mask, pre_svd_sgd

DATA = pathlib.Path(__file__).parent / "data" / "pre_svd_sgd_reference.npz"
PATHS = ("stem/kernel", "fc/kernel", "fc/bias")
PRE_SVD = r"^stem/kernel$"
STEPS = 7
COMBOS = [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA) as d:
        return {k: d[k] for k in d.files}


def _tree(ref, prefix: str, dtype=jnp.float32):
    get = lambda p: jnp.asarray(ref[prefix + p], dtype)
    return {"stem": {"kernel": get("stem/kernel")},
            "fc": {"kernel": get("fc/kernel"), "bias": get("fc/bias")}}


def _schedule():
    return optax.piecewise_constant_schedule(0.1, {3: 0.1})  # 0.1 for steps 0-2, then 0.01


def _emulate_f64(ref, nog: bool, olr: bool, lrs=(0.1,) * 3 + (0.01,) * 4):
    """Float64 NumPy emulation of the reference step (docs/nog_olr.md)."""
    params = {p: ref["init:" + p].copy() for p in PATHS}
    bufs = {p: None for p in PATHS}
    etas = []
    for t in range(STEPS):
        lr = lrs[t]
        for p in PATHS:
            g, eta = ref[f"grad{t}:{p}"].copy(), lr
            if p == "stem/kernel":
                if nog:
                    u, _, vt = np.linalg.svd(g.reshape(-1, g.shape[-1]), full_matrices=False)
                    g = (u @ vt).reshape(g.shape)
                if olr:
                    w, l = params[p].ravel(), g.ravel()  # noqa: E741
                    e = (w @ w) * (l @ w) / ((w @ w) * (l @ l) + 2 * (l @ w) ** 2)
                    eta = e if 0 < e < lr else lr
                    etas.append(eta)
            d = g + 5e-4 * params[p]
            bufs[p] = d if bufs[p] is None else 0.9 * bufs[p] + d
            params[p] = params[p] - eta * bufs[p]
    return params, np.array(etas)


def _run(ref, tx, dtype=jnp.float32, jit=True):
    params = _tree(ref, "init:", dtype)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    etas = []
    for t in range(STEPS):
        updates, state = update(_tree(ref, f"grad{t}:", dtype), state, params)
        params = optax.apply_updates(params, updates)
        eta = find_olr_eta(state)
        if eta is not None:
            etas.append(float(eta))
    return params, np.array(etas), state


def _flat(tree):
    return {"stem/kernel": tree["stem"]["kernel"], "fc/kernel": tree["fc"]["kernel"],
            "fc/bias": tree["fc"]["bias"]}


def _assert_rel_close(actual, expected, rtol):
    for p in PATHS:
        a, e = np.asarray(actual[p], np.float64), expected[p]
        err = np.abs(a - e).max() / np.abs(e).max()
        assert err < rtol, f"{p}: relative error {err:.2e}"


@pytest.mark.parametrize("nog,olr", COMBOS)
def test_emulation_reproduces_reference_vectors(ref, nog, olr):
    params, etas = _emulate_f64(ref, bool(nog), bool(olr))
    _assert_rel_close(params, {p: ref[f"final_nog{nog}_olr{olr}:{p}"] for p in PATHS}, 1e-12)
    if olr:
        np.testing.assert_allclose(etas, ref[f"etas_nog{nog}_olr1"], rtol=1e-12)


@pytest.mark.parametrize("nog,olr", COMBOS)
def test_pre_svd_sgd_matches_reference_float32(ref, nog, olr):
    tx = pre_svd_sgd(_schedule(), PRE_SVD, nog=bool(nog), olr=bool(olr))
    params, etas, _ = _run(ref, tx)
    _assert_rel_close(_flat(params), {p: ref[f"final_nog{nog}_olr{olr}:{p}"] for p in PATHS},
                      1e-5)
    if olr:
        np.testing.assert_allclose(etas, ref[f"etas_nog{nog}_olr1"], rtol=1e-5)
    else:
        assert etas.size == 0


@pytest.mark.parametrize("nog,olr", [(0, 1), (1, 1)])
def test_pre_svd_sgd_matches_emulation_float64(ref, nog, olr, x64):
    tx = pre_svd_sgd(_schedule(), PRE_SVD, nog=bool(nog), olr=bool(olr))
    params, etas, _ = _run(ref, tx, dtype=jnp.float64)
    expected, expected_etas = _emulate_f64(ref, bool(nog), bool(olr))
    _assert_rel_close(_flat(params), expected, 1e-10)
    np.testing.assert_allclose(etas, expected_etas, rtol=1e-10)


def test_nog_olr_eta_star_branch_matches_emulation(ref, x64):
    """With NOG on, the reference vectors never take the eta* branch (eta* >= lr or < 0 at
    every step), so check that branch with a larger constant rate against the emulation."""
    expected, expected_etas = _emulate_f64(ref, True, True, lrs=(0.3,) * STEPS)
    assert np.sum(expected_etas < 0.3) >= 2  # eta* branch taken at several steps
    params, etas, _ = _run(ref, pre_svd_sgd(0.3, PRE_SVD, nog=True, olr=True), jnp.float64)
    _assert_rel_close(_flat(params), expected, 1e-10)
    np.testing.assert_allclose(etas, expected_etas, rtol=1e-10)


def test_reference_exercises_both_olr_branches(ref):
    """Both switch branches occur in the (NOG off) trajectory: eta* < lr and lr."""
    etas = ref["etas_nog0_olr1"]
    lrs = np.array([0.1] * 3 + [0.01] * 4)
    assert np.any(etas < lrs) and np.any(etas == lrs)


def test_pre_svd_sgd_under_apply_if_finite(ref):
    tx = optax.apply_if_finite(pre_svd_sgd(_schedule(), PRE_SVD, nog=True, olr=True), 3)
    params = _tree(ref, "init:")
    state = tx.init(params)
    step = jax.jit(tx.update)
    bad = jax.tree_util.tree_map(lambda g: jnp.full_like(g, jnp.nan), _tree(ref, "grad0:"))
    updates, state = step(bad, state, params)
    chex.assert_trees_all_close(updates, jax.tree_util.tree_map(jnp.zeros_like, params))
    assert int(state.notfinite_count) == 1
    for t in range(STEPS):  # the skipped step left every inner state (counts included) as is
        updates, state = step(_tree(ref, f"grad{t}:"), state, params)
        params = optax.apply_updates(params, updates)
    _assert_rel_close(_flat(params), {p: ref[f"final_nog1_olr1:{p}"] for p in PATHS}, 1e-5)
    assert find_olr_eta(state) is not None


def test_pre_svd_sgd_without_jit_and_with_newton_schulz(ref):
    tx = pre_svd_sgd(_schedule(), PRE_SVD, nog=True, olr=False, nog_method="newton_schulz")
    params, _, _ = _run(ref, tx, jit=False)
    _assert_rel_close(_flat(params), {p: ref[f"final_nog1_olr0:{p}"] for p in PATHS}, 1e-4)


def test_no_match_raises_listing_paths(ref):
    params = _tree(ref, "init:")
    tx = pre_svd_sgd(0.1, r"^module\.stem/kernel$", nog=True)
    with pytest.raises(ValueError, match=r"available paths.*stem/kernel"):
        tx.init(params)
    with pytest.raises(ValueError, match="available paths"):
        pre_svd_mask(params, lambda path, leaf: False)


def test_pre_svd_mask_forms_agree(ref):
    params = _tree(ref, "init:")
    expected = {"stem": {"kernel": True}, "fc": {"kernel": False, "bias": False}}
    assert pre_svd_mask(params, PRE_SVD) == expected
    assert pre_svd_mask(params, lambda path, leaf: path.startswith("stem")) == expected
    assert pre_svd_mask(params, expected) == expected
    with pytest.raises(ValueError, match="structure"):
        pre_svd_mask(params, {"stem": True})


def test_selection_by_pytree_and_callable_give_same_trajectory(ref):
    expected = {"stem": {"kernel": True}, "fc": {"kernel": False, "bias": False}}
    a, _, _ = _run(ref, pre_svd_sgd(_schedule(), expected, nog=True, olr=True))
    b, _, _ = _run(ref, pre_svd_sgd(_schedule(), lambda p, x: x.ndim == 4, nog=True, olr=True))
    chex.assert_trees_all_close(a, b)


def test_find_olr_eta_absent_and_inject_hyperparams(ref):
    params = _tree(ref, "init:")
    assert find_olr_eta(optax.sgd(0.1).init(params)) is None
    tx = optax.inject_hyperparams(pre_svd_sgd, static_args=("pre_svd",))(
        learning_rate=0.1, pre_svd=PRE_SVD, olr=True)
    state = tx.init(params)
    _, state = tx.update(_tree(ref, "grad0:"), state, params)
    np.testing.assert_allclose(find_olr_eta(state), ref["etas_nog0_olr1"][0], rtol=1e-6)
