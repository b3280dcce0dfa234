"""The GPU check: budget rules, estimates as documented, and its CPU dry run in an
environment built like the GPU image (no TensorFlow, TFDS, clu or ml_collections).

No timing is asserted: the dry run's times say nothing about a GPU.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import carry_wheels, gpu_check, render, smoke

ROOT = Path(__file__).resolve().parent.parent

# The GPU image's Python packages as far as this machine has them (jax 0.10.2 for CPU
# here, 0.11.2 with the CUDA plugin there). Nothing else is installed: no TensorFlow,
# TFDS or clu, and ml_collections only as the carried wheel.
IMAGE_PACKAGES = ("jax==0.10.2", "jaxlib==0.10.2", "flax", "optax", "chex",
                  "orbax-checkpoint", "absl-py", "tensorboard", "scikit-learn", "matplotlib",
                  "tqdm", "numpy", "scipy", "pandas", "pyyaml", "hypothesis", "pytest")
# PyTorch's CPU wheel, only where pip finds it without a download of the CUDA build
# (this machine's wheel directory has it; PyPI's torch for Linux is the CUDA one).
TORCH_CPU = "torch==2.13.0+cpu"
ABSENT = ("tensorflow", "tensorflow_datasets", "clu", "ml_collections")


def _header() -> dict:
    return {"command": "test", "budget_s": 60.0, "tiny": True, "date": "today",
            "platform": "cpu", "device_kind": "cpu", "jax": "0", "wheels": [],
            "startup_s": 0.0}


def _ctx(tmp_path: Path, left_s: float) -> gpu_check.Context:
    return gpu_check.Context(gpu_check.TINY_SIZES, gpu_check.tiny_costs(),
                             deadline=time.monotonic() + left_s, out=tmp_path, tiny=True,
                             log=lambda _: None)


def _part(key: str, run, estimate_s: float = 1.0) -> gpu_check.Part:
    return gpu_check.Part(key, f"fake {key}", run, lambda ctx: (estimate_s, "fake"))


def test_parts_run_in_priority_order_write_as_they_end_and_skip_what_does_not_fit(tmp_path):
    order = []

    def first(ctx):
        order.append("first")
        return {"passed": True}

    def second(ctx):  # the first part's file exists before the second part starts
        order.append("second")
        assert json.loads((tmp_path / "p1.json").read_text())["status"] == "ok"
        return {"value": 1}

    def never(ctx):
        raise AssertionError("a part that does not fit must not run")

    def missing(ctx):
        raise gpu_check.Skip("PyTorch does not import")

    def broken(ctx):
        raise RuntimeError("boom")

    def wrong(ctx):
        return {"passed": False}

    def rows(ctx):
        return {"skipped_rows": [{"method": "svd", "reason": "estimated 9 s > 1 s left"}]}

    parts = [_part("p1", first), _part("p2", second), _part("p3", never, estimate_s=1e6),
             _part("p4", missing), _part("p5", broken), _part("p6", wrong),
             _part("p7", rows, estimate_s=1e6)._replace(minimum=lambda ctx: 1.0)]
    runner = gpu_check.Runner(_ctx(tmp_path, 60.0), parts, _header(),
                              hard_deadline=time.monotonic() + 60, cleanup=lambda: None)
    assert runner.run() == 1  # a part raised and a part failed its check
    assert order == ["first", "second"]
    status = {p.key: json.loads((tmp_path / f"{p.key}.json").read_text()) for p in parts}
    assert [status[k]["status"] for k in ("p1", "p2", "p3", "p4", "p5", "p6", "p7")] == [
        "ok", "ok", "skipped", "skipped", "error", "failed", "ok"]  # p7: its first row fits
    assert re.fullmatch(r"estimated 1000000 s > \d+ s left", status["p3"]["reason"])
    assert status["p4"]["reason"] == "PyTorch does not import"
    assert "RuntimeError: boom" in status["p5"]["result"]["traceback"]
    assert status["p2"]["result"] == {"value": 1} and status["p1"]["estimate_s"] == 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["part"], s.get("item")) for s in summary["skipped"]] == [
        ("p3", None), ("p4", None), ("p7", "svd")]
    assert "| p3 | skipped | 1000000 |" in (tmp_path / "summary.md").read_text()


def test_the_watchdog_ends_a_part_that_overruns_the_budget(tmp_path):
    """In a fresh process: the running part is recorded, the summary written, exit 0."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from benchmarks import gpu_check
        ctx = gpu_check.Context(gpu_check.TINY_SIZES, gpu_check.tiny_costs(),
                                deadline=time.monotonic() + 60, out=Path({str(tmp_path)!r}),
                                tiny=True)
        parts = [gpu_check.Part("slow", "slow", lambda ctx: time.sleep(60),
                                lambda ctx: (1.0, "wrong on purpose"))]
        gpu_check.Runner(ctx, parts, {_header()!r}, hard_deadline=time.monotonic() + 2,
                         cleanup=lambda: None).run()
        raise SystemExit(7)  # not reached: the watchdog exits first
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 40
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] == "slow"
    assert json.loads((tmp_path / "slow.json").read_text())["status"] == "interrupted"


def test_docstring_estimates_are_the_plans():
    """Each part's docstring states its GPU estimate; it is what --plan computes."""
    plan = {key: est for key, est, _ in gpu_check.plan(tiny=False)}
    for part in gpu_check.PARTS:
        match = re.search(r"Estimate on the GPU: ~(\d+) s", part.run.__doc__ or "")
        assert match, f"{part.key}: no 'Estimate on the GPU: ~N s' in its docstring"
        assert int(match.group(1)) == round(plan[part.key]), part.key


def test_parts_are_selected_by_key_or_prefix_in_priority_order():
    keys = [p.key for p in gpu_check.select_parts("f,a")]
    assert keys == ["a_smoke", "f1_table6_f32", "f2_table6_bf16_core", "f3_table6_bf16"]
    assert [p.key for p in gpu_check.select_parts(None)] == [p.key for p in gpu_check.PARTS]
    with pytest.raises(ValueError, match="unknown"):
        gpu_check.select_parts("z")


def test_peak_table_knows_the_gpus():
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 NVL") == 835.5
    assert gpu_check.peak_bf16_tflops("NVIDIA L40S") == 362.1
    assert gpu_check.peak_bf16_tflops("cpu") is None


@pytest.mark.parametrize("algorithm,n,reading", [
    (0, 64, "divide and conquer (syevd), one call per matrix [default for n > 32]"),
    (0, 16, "Jacobi (syevj) [default for n <= 32]"),
    (2, 256, "Jacobi (syevj)"),
    (1, 16, "divide and conquer (syevd), one call per matrix")])
def testeigh_reading_follows_jaxlibs_rule(algorithm, n, reading):
    assert smoke.eigh_reading("cusolver_syevd_ffi", algorithm, n).endswith(reading)
    assert smoke.eigh_reading("lapack_ssyevd_ffi", None, n) == (
        "LAPACK ssyevd on the host CPU")


def test_help_lists_the_parts():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    assert "--budget_s" in done.stdout and "f3_table6_bf16" in done.stdout


# --------------------------------------------------------------------------------------
# The dry run in an environment like the GPU image


def _venv_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "svdcond_jax"


def image_like_venv() -> tuple[Path, bool]:
    """A virtualenv with :data:`IMAGE_PACKAGES` (+ PyTorch's CPU wheel where pip has it).

    Built once per package list and Python (cached under ~/.cache/svdcond_jax; a few
    minutes from pip's cache, then reused). Returns its python and whether torch is in it.
    """
    key = hashlib.sha256(json.dumps([sys.version, IMAGE_PACKAGES, TORCH_CPU]).encode())
    venv = _venv_root() / f"gpu-image-venv-{key.hexdigest()[:12]}"
    python = venv / "bin" / "python"
    marker = venv / "built.json"
    if not marker.exists():
        tmp = venv.with_name(venv.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=300)
        pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *IMAGE_PACKAGES], check=True, timeout=900,
                       capture_output=True)
        torch = subprocess.run([*pip, "--only-binary=:all:", TORCH_CPU], timeout=900,
                               capture_output=True).returncode == 0
        (tmp / "built.json").write_text(json.dumps({"torch": torch}))
        shutil.rmtree(venv, ignore_errors=True)
        os.replace(tmp, venv)
    return python, json.loads(marker.read_text())["torch"]


def _copy_tree(dest: Path) -> Path:
    """The working tree as the GPU machine gets it: tracked + untracked, not ignored."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    dest.mkdir()
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
def test_dry_run_in_a_gpu_image_like_environment(tmp_path):
    """``python -m benchmarks.gpu_check --tiny`` from a copy of the tree, not installed.

    The environment has the GPU image's packages and nothing else; ml_collections comes
    only from the carried wheel. Every part either ran or says why it was skipped.
    """
    python, has_torch = image_like_venv()
    for module in ABSENT:
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} must not be importable in the image venv"
    tree = _copy_tree(tmp_path / "tree")
    (wheel,) = carry_wheels.fetch(tree / "wheels")
    assert wheel.name.endswith("-py3-none-any.whl") and wheel.stat().st_size < 1 << 20
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS", "SVDCOND_JAX_CACHE_DIR")}
    env["PYTHONPATH"] = str(tree)  # as on the GPU machine: the tree root, nothing installed
    out = tmp_path / "out"
    done = subprocess.run([str(python), "-m", "benchmarks.gpu_check", "--tiny",
                           "--budget_s", "420", "--out", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    for part in gpu_check.PARTS:
        record = json.loads((out / f"{part.key}.json").read_text())
        assert record["status"] in ("ok", "skipped"), (part.key, record)
        if record["status"] == "skipped":
            assert record["reason"], part.key
    status = {r["part"]: r["status"] for r in summary["parts"]}
    assert status["a_smoke"] == status["b_table6_core"] == "ok"
    smoke = json.loads((out / "a_smoke.json").read_text())["result"]
    assert smoke["eigh_backward"]["passed"] and smoke["digits"]["non_finite_steps"] == 0
    assert smoke["environment"]["wheels_on_path"] == [str(wheel.resolve())]
    assert not any(summary["imported"][m] for m in ("tensorflow", "tensorflow_datasets", "clu"))
    if has_torch:
        assert status["c_meta_layer"] == status["d_torch_step"] == "ok"
        meta = json.loads((out / "c_meta_layer.json").read_text())["result"]
        assert {r["method"] for r in meta["rows"]} >= {"eigh_exact", "torch_eigh_autograd"}
    text = (out / "summary.md").read_text()
    assert text == render.render_check(*render.read_check(out))
    assert "#### Environment and correctness smoke" in text and "#### Table 6" in text
    print(text)  # the dry run's report, shown with -s
    # Without the carried wheel nothing fails on an import: the parts that need the
    # training library say why they were skipped.
    bare = tmp_path / "bare"
    done = subprocess.run([str(python), "-m", "benchmarks.gpu_check", "--tiny", "--budget_s",
                           "120", "--parts", "a,b", "--wheels", str(tmp_path / "none"),
                           "--out", str(bare)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    table6 = json.loads((bare / "b_table6_core.json").read_text())
    assert table6["status"] == "skipped" and "ml_collections" in table6["reason"]
    smoke = json.loads((bare / "a_smoke.json").read_text())
    assert smoke["status"] == "ok" and "ml_collections" in smoke["result"]["digits"]["skipped"]


def test_carry_wheels_refuses_a_wheel_that_is_not_pure_python(tmp_path, monkeypatch):
    (tmp_path / "ml_collections-1.1.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"x")
    monkeypatch.setattr(carry_wheels.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    with pytest.raises(RuntimeError, match="no pure-Python wheel"):
        carry_wheels.fetch(tmp_path)
