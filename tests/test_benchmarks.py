"""The benchmarks at tiny sizes: comparators are faithful, every piece runs end to end.

No timing is asserted (speed targets live in the benchmarks' output, not in tests).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flax_resnet, step_vs_torch
from svdcond_jax import DecorrelatedBatchNorm, optimal_eta, polar_factor
from svdcond_jax.models import CifarResNet50, TinyResNet

ROOT = Path(__file__).resolve().parent.parent
KEY = jax.random.key(0, impl="rbg")


def _param_count(model, image_size: int) -> int:
    x = jnp.zeros((1, image_size, image_size, 3))
    variables = jax.eval_shape(lambda: model.init(KEY, x, train=False))
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def test_plain_flax_baseline_has_the_parameters_of_cifar_resnet50():
    expected = _param_count(CifarResNet50(num_classes=100), 32)
    assert expected == 23_705_252
    assert _param_count(flax_resnet.ResNet(num_classes=100), 32) == expected


@pytest.mark.parametrize("name,model", [("TinyResNet", TinyResNet),
                                        ("CifarResNet50", CifarResNet50)])
@pytest.mark.parametrize("method,stem_norm", [("bn", "bn"), ("svd+nog+olr", "dbn")])
def test_torch_twin_has_our_parameter_count(name, model, method, stem_norm):
    torch_resnet = pytest.importorskip("benchmarks.torch_resnet")
    twin = torch_resnet.model_for(method, name, num_classes=100)
    ours = _param_count(model(num_classes=100, stem_norm=stem_norm), 32)
    assert torch_resnet.parameter_count(twin) == ours


def test_torch_zca_whitening_equals_decorrelated_batch_norm(x64):
    torch = pytest.importorskip("torch")
    torch_resnet = pytest.importorskip("benchmarks.torch_resnet")
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 5)) * np.arange(1, 6)  # NHWC
    layer = DecorrelatedBatchNorm(use_running_average=False, epsilon=1e-2)
    variables = layer.init(KEY, jnp.asarray(x))
    ours, updates = layer.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    zca = torch_resnet.ZCAWhitening(5, eps=1e-2).double().train()
    theirs = zca(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    np.testing.assert_allclose(theirs.transpose(0, 2, 3, 1), ours, atol=1e-10)
    np.testing.assert_allclose(zca.running_whitening.numpy(),
                               updates["batch_stats"]["whitening"][0], atol=1e-12)


def test_torch_nog_and_olr_equal_our_transforms(x64):
    torch = pytest.importorskip("torch")
    torch_resnet = pytest.importorskip("benchmarks.torch_resnet")
    rng = np.random.default_rng(1)
    grad_hwio, w_hwio = rng.normal(size=(2, 3, 3, 3, 8))  # our kernel layout (kh, kw, in, out)
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))
    g = to_torch(grad_hwio)
    torch_resnet.nearest_orthogonal_(g)
    ours = polar_factor(jnp.asarray(grad_hwio.reshape(-1, 8)))  # (kh*kw*in, out)
    np.testing.assert_allclose(g.numpy().transpose(2, 3, 1, 0).reshape(-1, 8), ours,
                               atol=1e-10)
    eta = float(optimal_eta(jnp.asarray(w_hwio), jnp.asarray(grad_hwio)))
    for lr in (eta / 2, 2 * eta):  # the switch of Eq. 21 both ways (eta > 0 here or not)
        got = torch_resnet.optimal_lr(to_torch(w_hwio), to_torch(grad_hwio), lr)
        assert got == pytest.approx(eta if 0 < eta < lr else lr, rel=1e-12)


def test_torch_step_runs_every_method_and_bf16():
    pytest.importorskip("torch")
    torch_resnet = pytest.importorskip("benchmarks.torch_resnet")
    for method in torch_resnet.METHODS:
        model = torch_resnet.model_for(method, "TinyResNet", num_classes=10)
        step = torch_resnet.build_step(method, model=model, batch=4, image_size=8,
                                       num_classes=10, precision="bf16" if method == "svd"
                                       else "f32")
        assert np.isfinite([step(), step()]).all()
    with pytest.raises(ValueError, match="method"):
        torch_resnet.build_step("svd+ow", batch=2)


def test_step_vs_torch_workers_interleave_and_tabulate():
    pytest.importorskip("torch")
    args = step_vs_torch.parse_args(
        ["--methods", "svd+nog+olr", "--columns", "ours,torch", "--model", "TinyResNet",
         "--batch", "4", "--image_size", "8", "--num_classes", "10", "--rounds", "2",
         "--steps", "1"])
    report = step_vs_torch.run(args, log=lambda _: None)
    (row,) = report["rows"]
    assert set(row["columns"]) == {"ours", "torch"}
    for col in row["columns"].values():
        assert len(col["wall_s"]) == 2 and col["first_step_s"] > 0 and col["rss_peak_mb"] > 0
    assert len(set(report["params"].values())) == 1  # same network in both frameworks
    table = step_vs_torch.format_tables(report)
    assert "| `svd+nog+olr` |" in table and "ours / eager" in table
    assert report["versions"]["jax"] and report["versions"]["torch"]  # provenance recorded
    assert f"jax {report['versions']['jax']}" in table


def _python(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scipy_first", [False, True])
def test_runtime_caps_lapack_threads_and_caches_compilations(tmp_path, scipy_first):
    """In a fresh process: jax's eigh LAPACK runs on one OpenBLAS thread; the cache fills."""
    pytest.importorskip("threadpoolctl")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["SVDCOND_JAX_CACHE_DIR"] = str(tmp_path / "cache")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    info = _python(f"""
        import json, os
        if {scipy_first}:
            import scipy.linalg  # OpenBLAS loaded before configure: threadpoolctl caps it
        from svdcond_jax.training import runtime
        settings = runtime.configure()
        import jax, jax.numpy as jnp, threadpoolctl
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.jit(lambda a: jnp.linalg.eigh(a)[0])(jnp.eye(40) * 2.0).block_until_ready()
        threads = [p["num_threads"] for p in threadpoolctl.threadpool_info()
                   if p["internal_api"] == "openblas"]
        print(json.dumps({{**settings, "threads": threads,
                          "env": os.environ["OPENBLAS_NUM_THREADS"]}}))
    """, env)
    assert info["blas_threads"] == 1 and info["env"] == "1"
    assert info["threads"] and set(info["threads"]) == {1}
    assert info["cache_dir"] == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())
    explicit = _python("""
        import json
        from svdcond_jax.training import runtime
        print(json.dumps(runtime.configure(cache_dir=None)))
    """, {**env, "OPENBLAS_NUM_THREADS": "2"})
    assert explicit == {"blas_threads": 2, "cache_dir": None}  # the user's setting wins


def test_polar_benchmark_quick_rows_meet_the_accuracy_target():
    """benchmarks/polar.py at two tiny shapes: every method runs, polar_express is within
    1e-2 of 1 on the non-null space with Muon's product count, Muon's routine is not."""
    from benchmarks import polar

    report = polar.run(polar.QUICK_SHAPES, repeats=1, log=lambda _: None)
    rows = {(r["shape"], r["method"]): r for r in report["rows"]}
    assert len(rows) == len(polar.QUICK_SHAPES) * len(polar.METHODS)
    for shape, _, _ in polar.QUICK_SHAPES:
        fast, muon = rows[(shape, "polar_express")], rows[(shape, "muon")]
        assert fast["max_abs_s_minus_1"] <= 1e-2 < muon["max_abs_s_minus_1"]
        assert fast["products"] == muon["products"] == 15
        assert rows[(shape, "svd")]["cos"] > 1 - 1e-6
    report.update(polar.provenance(["--quick"]), repeats=1, load_avg_end=(0.0, 0.0, 0.0))
    assert "| polar_express |" in polar.markdown(report)


def test_polar_benchmark_times_a_whole_update():
    from benchmarks import polar

    report = polar.run_update("TinyResNet", repeats=1, log=lambda _: None)
    assert report["kernels"] == 6  # TinyResNet's convs, fc excluded
    assert [r["method"] for r in report["update_rows"]][-1] == "optax.contrib.muon"
    report.update(polar.provenance(["--update", "TinyResNet"]), repeats=1,
                  load_avg_end=(0.0, 0.0, 0.0))
    assert "| nog_optimizer polar_express |" in polar.update_markdown(report)
