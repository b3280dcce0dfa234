"""End to end: train_and_evaluate on digits and on TFDS mocks, jit vs pmap, exact resume."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from svdcond_jax.training import checkpointing, writers
from svdcond_jax.training.config import get_config
from svdcond_jax.training.loop import train_and_evaluate

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"method", "dataset", "model", "seed", "steps", "val_error", "val_examples",
                "cv_folds", "cv_fold", "best_val_error",
                "final_kappa_eps", "median_kappa_eps", "final_kappa_raw", "svd_failures",
                "train_time_s", "steps_per_s", "complete", "history_problem"}
FIELDS = {
    "train": {"loss", "accuracy", "learning_rate", "olr_eta", "svd_failures", "epoch", "seq"},
    "eval": {"loss", "accuracy", "error", "examples", "epoch", "seq"},
    "conditioning": {"kappa_raw", "kappa_eps", "lambda_max", "lambda_min", "rank", "dim",
                     "singular", "weight_norm", "olr_eta", "finite", "seq"},
    "summary": SUMMARY_KEYS | {"seq"},
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Share compiled steps between the runs of this module (same HLO, new closures)."""
    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def _digits_config(**overrides):
    config = get_config()
    config.update(dict(method="svd+nog+olr", num_filters=4, image_size=8, batch_size=16,
                       eval_batch_size=16, max_train_examples=64, max_eval_examples=24,
                       num_train_steps=6, monitor_every_steps=2, log_every_steps=1,
                       lr_boundaries_epochs=[1], progress_bar=False))
    config.update(overrides)
    return config


def _final_params(workdir):
    return checkpointing.load_arrays(workdir)["params"]


def _assert_trees(a, b, exact=True):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def _check_schema(workdir, summary):
    records = writers.read_metrics(workdir)
    for r in records:
        assert isinstance(r["step"], int) and FIELDS[r["kind"]] <= set(r), r
    assert records[-1]["kind"] == "summary" and [r["kind"] for r in records].count(
        "summary") == 1
    assert {k: records[-1][k] for k in SUMMARY_KEYS} == {k: summary[k] for k in SUMMARY_KEYS}
    assert [r["seq"] for r in records] == list(range(len(records)))  # whole history
    assert summary["complete"] is True and summary["history_problem"] is None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            json.loads(line)  # strict JSON (no NaN / Infinity)
    return records


def test_digits_resume_equals_uninterrupted_and_pmap_equals_jit(tmp_path):
    full = train_and_evaluate(_digits_config(), str(tmp_path / "full"))
    records = _check_schema(str(tmp_path / "full"), full)
    assert full["steps"] == 6 and full["svd_failures"] == 0 and full["method"] == "svd+nog+olr"
    assert 0.0 <= full["val_error"] <= 100.0 and full["final_kappa_eps"] > 1.0
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(r["olr_eta"] is not None and 0 < r["olr_eta"] <= np.float32(0.1) for r in train)
    assert train[-1]["learning_rate"] == pytest.approx(0.01)  # /10 after epoch 1 (4 steps)
    cond = [r for r in records if r["kind"] == "conditioning"]
    assert [r["step"] for r in cond] == [2, 4, 6] and cond[0]["dim"] == 4
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 6]
    assert os.listdir(tmp_path / "full" / "tensorboard")
    assert checkpointing.load_arrays(str(tmp_path / "full"))["step"] == 6

    # interrupted mid-epoch at step 3, then resumed from the workdir
    part = str(tmp_path / "resumed")
    train_and_evaluate(_digits_config(num_train_steps=3), part)
    resumed = train_and_evaluate(_digits_config(), part)
    # exact: the same process and compiled programs continue from the saved arrays
    _assert_trees(_final_params(part), _final_params(str(tmp_path / "full")))
    steps = [r["step"] for r in writers.read_metrics(part, "train")]
    assert steps == list(range(1, 7)) and resumed["steps"] == 6
    _check_schema(part, resumed)

    pmap = train_and_evaluate(_digits_config(parallel="pmap"), str(tmp_path / "pmap"))
    _check_schema(str(tmp_path / "pmap"), pmap)
    _assert_trees(_final_params(str(tmp_path / "pmap")), _final_params(str(tmp_path / "full")),
                  exact=False)
    # jit and pmap agree to round-off; one of the 24 eval predictions may flip on a near tie
    assert abs(pmap["val_error"] - full["val_error"]) <= 100.0 / 24 + 1e-9
    for a, b in zip(writers.read_metrics(str(tmp_path / "pmap"), "eval"),
                    writers.read_metrics(str(tmp_path / "full"), "eval"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_bn_method_monitors_stem_rank_deficiency(tmp_path):
    config = _digits_config(method="bn", num_filters=16, num_train_steps=2,
                            monitor_every_steps=1)
    summary = train_and_evaluate(config, str(tmp_path))
    cond = writers.read_metrics(str(tmp_path), "conditioning")
    # digits are gray repeated to 3 channels: 3x3 patches span 9 dims of the 16 outputs
    assert all(r["singular"] and r["rank"] <= 9 and r["dim"] == 16 for r in cond)
    assert summary["final_singular"] is True and summary["final_rank"] <= 9
    assert cond[-1]["olr_eta"] is None


@pytest.mark.parametrize("dataset,method,extra", [
    ("cifar100", "svd+ow", {}),
    ("imagenet2012", "svd+nog+olr", {"image_size": 4, "gcp_dim": 8}),
])
def test_tfds_mock_end_to_end(tmp_path, dataset, method, extra):
    options = {"image_size": -1, **extra}
    config = _digits_config(dataset=dataset, method=method, batch_size=4, eval_batch_size=4,
                            num_train_steps=2, max_train_examples=-1, max_eval_examples=-1,
                            **options)
    with tfds.testing.mock_data(num_examples=8):
        summary = train_and_evaluate(config, str(tmp_path))
    records = _check_schema(str(tmp_path), summary)
    assert summary["dataset"] == dataset and summary["steps"] == 2
    assert summary["svd_failures"] == 0 and np.isfinite(summary["val_error"])
    cond = [r for r in records if r["kind"] == "conditioning"]
    if dataset == "imagenet2012":  # GCP: per-image covariance, 2x2 positions < 8 channels
        assert cond[-1]["dim"] == 8 and cond[-1]["singular"] and cond[-1]["rank"] <= 3
        # eps = 0 and singular: no condition number (null), one on the non-zero spectrum
        assert cond[-1]["kappa_eps_max"] is None and cond[-1]["kappa_eps"] is None
        assert cond[-1]["kappa_nonzero"] >= 1.0
    else:
        assert cond[-1]["dim"] == 4


def test_gcp_step_with_a_batched_eigh_does_not_deadlock_on_two_cpu_devices(tmp_path):
    # Regression: jaxlib's batched CPU eigh waits on the intra-op pool; with 2 devices both
    # pool threads waited and this run hung (solvers/_common.eigh decomposes one at a time).
    config = _digits_config(task="gcp", gcp_dim=16, method="svd", batch_size=32,
                            num_train_steps=2, max_train_examples=64)
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 2 and summary["svd_failures"] == 0
