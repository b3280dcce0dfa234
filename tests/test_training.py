"""Training library units: methods, schedule, monitor, writers, jit/pmap steps, NaN skip,
the optimizer's injected learning rate, periodic actions, eval metrics, the workdir lock."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svdcond_jax.optimizers import find_olr_eta, pre_svd_sgd
from svdcond_jax.training import loop, methods, monitor, steps, writers
from svdcond_jax.training import state as state_lib
from svdcond_jax.training.config import get_config
from svdcond_jax.training.state import TrainState, create_learning_rate_fn, create_setup
from svdcond_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock

PATTERN = r"^stem_conv/kernel$"


# ----------------------------------------------------------------------------- methods


def test_methods_are_the_papers_rows():
    assert len(methods.METHODS) == 15 == len(set(methods.METHODS))
    specs = {m: methods.parse_method(m) for m in methods.METHODS}
    assert not specs["bn"].uses_svd and all(s.uses_svd for m, s in specs.items() if m != "bn")
    assert specs["svd_autodiff"].meta_method == "eigh_autodiff"
    assert specs["newton_schulz"].meta_method == "newton_schulz"
    assert specs["svd+nog+ow+olr"][3:7] == ("ow", True, True, False)
    assert specs["svd+nog+sn"][3:7] == ("sn", True, False, False)
    assert specs["svd+ol"][3:7] == ("none", False, False, True)
    for name, spec in specs.items():
        assert spec.nog == ("nog" in name) and spec.olr == ("olr" in name)
    with pytest.raises(ValueError, match="svd\\+nog"):
        methods.parse_method("svd+magic")


@pytest.mark.parametrize("dataset,task", [("cifar100", "dbn"), ("digits", "dbn"),
                                          ("imagenet2012", "gcp")])
def test_model_options_per_task(dataset, task):
    config = get_config()
    assert methods.resolve_task("auto", dataset) == task
    svd = methods.model_options(methods.parse_method("svd+ow"), task, config)
    bn = methods.model_options(methods.parse_method("bn"), task, config)
    assert (svd["stem_norm"], svd["head"]) == (("dbn", "gap") if task == "dbn" else ("bn", "gcp"))
    assert svd["pre_svd"] == "ow" and bn["pre_svd"] == "none"
    assert (bn["stem_norm"], bn["head"]) == ("bn", "gap")
    ns = methods.model_options(methods.parse_method("newton_schulz"), task, config)
    assert ns["meta_kwargs"] == {"num_iters": config.ns_iters}


def test_learning_rate_schedule_is_step_based():
    config = get_config()
    config.learning_rate, config.lr_boundaries_epochs, config.lr_decay = 0.1, [2, 3], 0.1
    fn = create_learning_rate_fn(config, steps_per_epoch=5)
    got = [float(fn(s)) for s in (0, 9, 10, 14, 15, 100)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_setup_selects_pre_svd_layer_and_optimizer_flags():
    config = get_config()
    config.method = "svd+nog+ol"
    setup = create_setup(config, num_classes=10, steps_per_epoch=4)
    assert setup.pre_svd_pattern == PATTERN and setup.monitor_eps == config.dbn_eps
    assert setup.ol_coeff == config.ol_coeff and setup.spec.nog and not setup.spec.olr
    config.method = "bn"
    setup = create_setup(config, num_classes=10, steps_per_epoch=4)
    assert setup.ol_coeff == 0.0 and setup.model.stem_norm == "bn"


def test_setup_and_steps_are_shared_by_seeds_of_one_config():
    config = get_config()
    config.method = "newton_schulz"  # meta_kwargs is a dict: the model is not hashable
    first = create_setup(config, num_classes=10, steps_per_epoch=4)
    config.seed = 7
    assert create_setup(config, num_classes=10, steps_per_epoch=4) is first
    init = first.init
    assert create_setup(config, num_classes=10, steps_per_epoch=4).init is init
    config.learning_rate = 0.05  # another config: another setup
    assert create_setup(config, num_classes=10, steps_per_epoch=4) is not first
    kw = {"ol_coeff": 0.0, "ol_pattern": None, "capture_stem": False}
    assert steps.make_parallel("jit", **kw) is steps.make_parallel("jit", **kw)


# ----------------------------------------------------------------------------- monitor


def _low_rank_features(rng, rank, dim, shape=(4, 6, 6)):
    z = rng.normal(size=(*shape, rank))
    return z @ rng.normal(size=(rank, dim)) + rng.normal(size=dim)


@pytest.mark.parametrize("rank,dim", [(3, 8), (5, 16), (27, 64)])
def test_monitor_marks_rank_deficient_covariance_singular(rank, dim):
    x = _low_rank_features(np.random.default_rng(rank), rank, dim).astype(np.float32)
    rec = monitor.conditioning_stats(x, eps=1e-2)
    assert rec["singular"] and rec["rank"] == rank and rec["dim"] == dim
    # a singular matrix has no condition number: None (JSON null), never the 1/eps cap
    assert rec["kappa_raw"] is None
    # with eps*I the matrix is invertible: kappa = (lambda_max + eps) / (~0 + eps)
    assert rec["kappa_eps"] == pytest.approx((rec["lambda_max"] + 1e-2) / 1e-2, rel=1e-6)
    assert "sing(r" in monitor.format_kappa(rec)
    # on the non-zero spectrum: the float64 reference's top `rank` eigenvalues
    lam = np.linalg.eigvalsh(np.cov(x.reshape(-1, dim).astype(np.float64).T, bias=True))
    assert rec["kappa_nonzero"] == pytest.approx(lam[-1] / lam[-rank], rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monitor_full_rank_matches_float64_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 5, 5, 6)) * np.array([1, 2, 3, 4, 5, 60.0])
    rec = monitor.conditioning_stats(x, eps=0.5)
    lam = np.linalg.eigvalsh(np.cov(x.reshape(-1, 6).T, bias=True))
    assert not rec["singular"] and rec["rank"] == 6
    assert rec["kappa_raw"] == pytest.approx(lam[-1] / lam[0], rel=1e-9)
    assert rec["kappa_nonzero"] == pytest.approx(rec["kappa_raw"], rel=1e-12)
    assert rec["kappa_eps"] == pytest.approx((lam[-1] + 0.5) / (lam[0] + 0.5), rel=1e-9)
    assert rec["lambda_min"] == pytest.approx(lam[0], rel=1e-9)


def test_monitor_per_image_gcp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 2, 3, 10))  # 6 samples per image < 10 channels
    rec = monitor.conditioning_stats(x, eps=0.0, per_image=True)
    assert rec["singular"] and rec["rank"] == 5 and rec["dim"] == 10  # centred: 6 - 1
    assert rec["kappa_raw"] is None and rec["kappa_eps"] is None  # eps = 0: singular too
    assert rec["kappa_nonzero"] is not None and rec["kappa_nonzero"] >= 1.0
    full = monitor.conditioning_stats(rng.normal(size=(5, 4, 4, 3)), eps=0.0, per_image=True)
    assert not full["singular"] and full["kappa_eps_max"] >= full["kappa_eps"]


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_monitor_records_non_finite_features_instead_of_raising(per_image, bad):
    x = np.random.default_rng(0).normal(size=(4, 3, 3, 5))
    good = monitor.conditioning_stats(x, eps=1e-2, per_image=per_image)
    x[1, 2, 0, 3] = bad
    rec = monitor.conditioning_stats(x, eps=1e-2, per_image=per_image)
    assert set(rec) == set(good) and good["finite"] is True
    assert rec["finite"] is False and rec["dim"] == 5
    assert all(rec[k] is None for k in rec if k not in ("finite", "dim"))
    assert monitor.format_kappa(rec) == "non-finite"


# ----------------------------------------------------------------------------- writers


def test_writer_records_are_plain_json(tmp_path):
    w = writers.MetricsWriter(str(tmp_path), tensorboard=False)
    w.write(1, "train", {"loss": np.float32(0.5), "n": np.int32(3), "flag": np.bool_(True),
                         "bad": float("nan"), "none": None})
    w.write(2, "eval", {"error": 10.0})
    w.write(3, "summary", {"x": 1})
    with pytest.raises(ValueError, match="kind"):
        w.write(4, "other", {})
    w.close()
    recs = writers.read_metrics(str(tmp_path))
    assert recs[0] == {"step": 1, "kind": "train", "seq": 0, "loss": 0.5, "n": 3,
                       "flag": True, "bad": None, "none": None}
    assert [r["seq"] for r in recs] == [0, 1, 2] and w.count == 3
    writers.truncate_metrics(str(tmp_path), 2)
    assert [r["kind"] for r in writers.read_metrics(str(tmp_path))] == ["train", "eval"]


def test_a_line_cut_by_a_crash_does_not_break_reading_or_resume(tmp_path):
    w = writers.MetricsWriter(str(tmp_path), tensorboard=False)
    w.write(1, "train", {"loss": 0.5})
    w.close()
    with open(tmp_path / writers.METRICS_FILE, "a") as f:
        f.write('{"step": 2, "kind": "tra')  # killed mid-write
    assert [r["step"] for r in writers.read_metrics(str(tmp_path))] == [1]
    writers.truncate_metrics(str(tmp_path), 1)  # what resume does
    assert [r["step"] for r in writers.read_metrics(str(tmp_path))] == [1]


def _records(seqs):
    return [{"step": i + 1, "kind": "train", "seq": q} for i, q in enumerate(seqs)]


def test_history_problem_finds_missing_duplicated_and_foreign_records():
    assert writers.history_problem(_records(range(5)), 5) is None
    assert writers.history_problem([], 0) is None
    legacy = [{"step": 1, "kind": "train"}, {"step": 2, "kind": "train"}]  # no seq: position
    assert writers.history_problem(legacy + [{"step": 3, "kind": "eval", "seq": 2}], 3) is None
    gap = writers.history_problem(_records([0, 1, 5, 6]), 7)
    assert gap == "metrics.jsonl holds 4 of the 7 records this run wrote: 3 missing (seq 2-4)"
    head = writers.history_problem(_records([3, 4]), 5)
    assert "3 missing (seq 0-2)" in head
    dup = writers.history_problem(_records([0, 1, 1, 2]), 3)
    assert "1 duplicated" in dup and "missing" not in dup
    foreign = writers.history_problem(_records([0, 1, 2, 3]), 2)
    assert "2 not written by this run (seq 2-3)" in foreign
    assert writers.history_problem(_records([1, 0]), 2).endswith("out of order")


def test_truncate_keeps_the_records_before_the_checkpoint_atomically(tmp_path):
    w = writers.MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3, 4):
        w.write(step, "train", {"loss": 1.0})
        w.write(step, "conditioning", {"kappa_eps": 2.0})
    w.write(4, "summary", {"x": 1})
    w.close()
    kept = writers.truncate_metrics(str(tmp_path), 2, keep_records=3)  # seq 0-2
    assert [(r["step"], r["kind"]) for r in kept] == [(1, "train"), (1, "conditioning"),
                                                       (2, "train")]
    assert writers.read_metrics(str(tmp_path)) == kept
    assert os.listdir(tmp_path) == [writers.METRICS_FILE]  # no temporary file left
    resumed = writers.MetricsWriter(str(tmp_path), tensorboard=False, first_seq=3)
    resumed.write(2, "conditioning", {"kappa_eps": 2.0})
    assert writers.history_problem(writers.read_metrics(str(tmp_path)), resumed.count) is None
    assert writers.truncate_metrics(str(tmp_path), -1, keep_records=0) == []


def test_workdir_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    with WorkdirLock(str(tmp_path)) as lock:
        info = json.loads(open(lock.path).read())
        assert info["pid"] == os.getpid()
        with pytest.raises(WorkdirBusyError, match=f"held by pid {os.getpid()} on "):
            WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(ValueError, match="boom"), WorkdirLock(str(tmp_path)):
        raise ValueError("boom")
    second = WorkdirLock(str(tmp_path))
    second.acquire()  # released by both exits above
    second.release()


# ----------------------------------------------------------------------------- periodic


def _old_triggers(done, total, spe, config):
    """The loop's hand-counted schedule before clu.periodic_actions (the reference)."""
    epoch, last = (done - 1) // spe, done == total
    epoch_end = done % spe == 0 or last
    return {"log": done % config.log_every_steps == 0 or last,
            "monitor": done % config.monitor_every_steps == 0 or last,
            "eval": epoch_end and ((epoch + 1) % config.eval_every_epochs == 0 or last),
            "checkpoint": epoch_end and ((epoch + 1) % config.checkpoint_every_epochs == 0
                                         or last)}


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 40), spe=st.integers(1, 9), log=st.integers(1, 7),
       mon=st.integers(1, 7), ev=st.integers(1, 4), ck=st.integers(1, 4),
       start_frac=st.floats(0, 1))
def test_periodic_actions_trigger_exactly_where_the_hand_counted_loop_did(
        total, spe, log, mon, ev, ck, start_frac):
    config = get_config()
    config.update(dict(log_every_steps=log, monitor_every_steps=mon, eval_every_epochs=ev,
                       checkpoint_every_epochs=ck))
    start = int(start_frac * (total - 1))  # a resumed run starts mid-way
    every = loop.periodic_every_steps(config, spe)
    for name, period in every.items():
        fired = [d for d in range(start + 1, total + 1) if loop.due(d, period, total)]
        want = [d for d in range(start + 1, total + 1)
                if _old_triggers(d, total, spe, config)[name]]
        assert fired == want, name


# ----------------------------------------------------------------------------- eval metrics


def test_eval_accumulates_float64_sums_over_padded_batches(monkeypatch):
    rng = np.random.default_rng(0)
    batches = [{"loss_sum": np.float32(rng.uniform(0, 40)), "correct": np.float32(k),
                "count": np.float32(n)} for k, n in ((3, 16), (9, 16), (2, 5), (0, 0))]
    feed = iter(batches)

    class FakePar:
        def place_batch(self, batch):
            return batch

        def eval_step(self, state, batch):
            return next(feed)

        def host(self, x):
            return x

    monkeypatch.setattr(loop.input_pipeline, "eval_batches",
                        lambda data, batch_size: iter(range(len(batches))))
    config = get_config()
    out = loop.evaluate(config, None, FakePar(), None)
    count = sum(float(b["count"]) for b in batches)
    want = sum(float(b["loss_sum"]) for b in batches) / count
    assert out["loss"] == pytest.approx(want, rel=1e-12)
    assert out["accuracy"] == pytest.approx(14 / count, rel=1e-12)
    assert out["error"] == pytest.approx(100 * (1 - 14 / count), rel=1e-12)


# ----------------------------------------------------------------------------- optimizer


def test_injected_learning_rate_is_the_applied_one_and_olr_eta_is_found():
    config = get_config()
    config.update(dict(method="svd+nog+olr", learning_rate=0.1, lr_boundaries_epochs=[1],
                       lr_decay=0.5))
    setup = create_setup(config, num_classes=3, steps_per_epoch=2)
    params = {"stem_conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "fc": {"bias": jnp.ones(3)}}
    opt_state = setup.tx.init(params)
    assert isinstance(opt_state, optax.InjectStatefulHyperparamsState)
    seen = []
    for _ in range(4):
        _, opt_state = setup.tx.update(params, opt_state, params)
        seen.append(float(state_lib.learning_rate(opt_state)))
        assert float(find_olr_eta(opt_state)) > 0  # found inside the wrapped state
    np.testing.assert_allclose(seen, [0.1, 0.1, 0.05, 0.05], rtol=1e-6)
    assert set(opt_state.hyperparams) == {"learning_rate"}  # momentum/wd stay static
    # the wrapped optimizer makes the same updates as pre_svd_sgd with the schedule
    plain = pre_svd_sgd(setup.learning_rate_fn, setup.pre_svd_pattern, nog=True, olr=True,
                        momentum=config.momentum, weight_decay=config.weight_decay)
    a, b = setup.tx.init(params), plain.init(params)
    p = q = params
    for _ in range(3):
        ua, a = setup.tx.update(p, a, p)
        ub, b = plain.update(q, b, q)
        p, q = optax.apply_updates(p, ua), optax.apply_updates(q, ub)
    for x, y in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- steps


class _TinyNet(nn.Module):
    """A model of our own: conv stem + BatchNorm (global statistics via axis_name) + head."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(6, (3, 3), use_bias=False, name="stem_conv")(x)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
        return nn.Dense(3)(nn.relu(x).mean((1, 2)))


def _tiny_state(axis_name=None, nog=True, olr=True):
    model = _TinyNet(axis_name=axis_name)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)), train=False)
    tx = pre_svd_sgd(0.1, PATTERN, nog=nog, olr=olr)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"],
                             svd_failures=jnp.zeros((), jnp.int32))


def _batches(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(size, 6, 6, 2)).astype(np.float32),
             "label": rng.integers(0, 3, size).astype(np.int32)} for _ in range(n)]


def _make(mode):
    return steps.make_parallel(mode, ol_coeff=0.0, ol_pattern=None, capture_stem=True)


def _run(mode, batches, axis_name):
    par = _make(mode)
    state = par.place_state(_tiny_state(axis_name))
    for batch in batches:
        state, metrics = par.train_step(state, par.place_batch(batch))
    return jax.device_get(par.host_state(state)), par.host(metrics)


def test_jit_over_mesh_and_pmap_give_the_same_parameters():
    assert jax.device_count() == 2
    batches = _batches(3)
    jit_state, jit_m = _run("jit", batches, None)
    pmap_state, pmap_m = _run("pmap", batches, steps.AXIS_NAME)
    for a, b in zip(jax.tree_util.tree_leaves((jit_state.params, jit_state.batch_stats)),
                    jax.tree_util.tree_leaves((pmap_state.params, pmap_state.batch_stats)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert int(jit_state.step) == int(pmap_state.step) == 3
    np.testing.assert_allclose(jit_m["loss"], pmap_m["loss"], rtol=1e-5)
    # and training did something
    init = _tiny_state()
    assert not np.allclose(init.params["stem_conv"]["kernel"], jit_state.params["stem_conv"]
                           ["kernel"])


def test_single_device_step_matches_mesh_step():
    batches = _batches(2)
    state = _tiny_state()
    step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=lambda s: 0.1))
    for batch in batches:
        state, _ = step(state, batch)
    mesh_state, _ = _run("jit", batches, None)
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(mesh_state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_nan_batch_is_counted_and_skipped(mode):
    par = _make(mode)
    axis = steps.AXIS_NAME if mode == "pmap" else None
    good, bad = _batches(2, seed=1)
    bad["image"][0, 0, 0, 0] = np.nan  # one poisoned pixel on the first device's shard
    state, _ = par.train_step(par.place_state(_tiny_state(axis)), par.place_batch(good))
    before = jax.device_get(par.host_state(state))
    state, metrics = par.train_step(state, par.place_batch(bad))
    after = jax.device_get(par.host_state(state))
    metrics = par.host(metrics)
    assert metrics["finite"] == 0.0 and int(metrics["svd_failures"]) == 1
    assert int(after.step) == 2 and int(after.svd_failures) == 1
    for a, b in zip(jax.tree_util.tree_leaves((before.params, before.batch_stats,
                                               before.opt_state)),
                    jax.tree_util.tree_leaves((after.params, after.batch_stats,
                                               after.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    state, metrics = par.train_step(state, par.place_batch(good))
    final = jax.device_get(par.host_state(state))
    assert par.host(metrics)["finite"] == 1.0 and int(final.svd_failures) == 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(final.params))
    assert not np.array_equal(final.params["Dense_0"]["kernel"],
                              after.params["Dense_0"]["kernel"])


def test_eval_step_masks_padding():
    par = _make("jit")
    state = par.place_state(_tiny_state())
    batch = _batches(1)[0]
    batch["mask"] = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32)
    sums = par.host(par.eval_step(state, par.place_batch(batch)))
    assert float(sums["count"]) == 3.0 and 0.0 <= float(sums["correct"]) <= 3.0
    batch["image"][3:] = np.nan  # padded rows never count
    assert np.isfinite(par.host(par.eval_step(state, par.place_batch(batch)))["loss_sum"])


def test_features_step_captures_stem_output():
    par = _make("jit")
    state = par.place_state(_tiny_state())
    feats = jax.device_get(par.features_step(state, par.place_batch(_batches(1)[0])))
    assert feats.shape == (8, 6, 6, 6)
    rec = monitor.conditioning_stats(feats, eps=1e-2)
    assert rec["dim"] == 6 and rec["rank"] == 6  # 2 channels x 3x3 = 18 >= 6


# ----------------------------------------------------------------------------- pairing


def test_methods_of_one_seed_start_from_the_same_parameters_where_the_trees_coincide():
    """The paired design of the sweeps: for a seed, every method's initial parameters
    equal on every path they share (only the method's own layers differ)."""
    from flax.traverse_util import flatten_dict

    config = get_config()
    config.update(dict(image_size=8, input_channels=1, num_filters=8))
    inits = {}
    for method in ("bn", "svd", "svd+nog+olr", "svd+ow", "newton_schulz"):
        config.method = method
        setup = create_setup(config, num_classes=10, steps_per_epoch=4)
        state = state_lib.create_train_state(
            jax.random.key(config.seed, impl=config.prng_impl), setup, (8, 8, 3))
        inits[method] = flatten_dict(jax.device_get(state.params), sep="/")
    ref = inits["svd"]
    for method, params in inits.items():
        shared = {p for p in set(params) & set(ref) if params[p].shape == ref[p].shape}
        assert len(shared) >= len(ref) - 3, (method, set(ref) - shared)  # SOC's own kernel
        for path in shared:
            np.testing.assert_array_equal(params[path], ref[path], err_msg=f"{method} {path}")


def test_monitor_with_relative_eps_reads_the_matrix_the_layer_decomposes():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(6, 40))
    p = p @ p.T / 40
    lam = np.linalg.eigvalsh(p)
    ridge = 0.01 * np.trace(p) / 6
    stats = monitor.eigen_stats(p, eps=0.01, relative_eps=True)
    np.testing.assert_allclose(stats["kappa_eps"], (lam[-1] + ridge) / (lam[0] + ridge),
                               rtol=1e-10)
    scaled = monitor.eigen_stats(25.0 * p, eps=0.01, relative_eps=True)
    np.testing.assert_allclose(scaled["kappa_eps"], stats["kappa_eps"], rtol=1e-10)
