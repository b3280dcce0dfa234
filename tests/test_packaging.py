"""The light core: `import svdcond_jax` and a jitted NOG step need no experiment extra."""

import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

# Packages that only the `experiments` extra installs (besides TensorFlow itself).
EXTRA_ONLY = ("tensorflow", "tensorflow_datasets", "sklearn", "matplotlib", "clu",
              "ml_collections", "tqdm", "tensorboard")

_PROGRAM = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        # Makes TensorFlow unimportable, as on a machine with the core install only.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ImportError(f"{name} is blocked by the test")
            return None

    sys.meta_path.insert(0, _Block())

    import jax, jax.numpy as jnp, optax
    import svdcond_jax as sc

    params = {"stem": {"kernel": jnp.ones((3, 3, 2, 4))}, "fc": {"bias": jnp.zeros(2)}}
    tx = sc.pre_svd_sgd(0.1, r"^stem/kernel$", nog=True, olr=True)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert bool(jnp.all(jnp.isfinite(params["stem"]["kernel"])))
    loaded = sorted(m for m in {EXTRA!r} if m in sys.modules)
    print("EXTRA_LOADED", loaded)
    """
).replace("{EXTRA!r}", repr(EXTRA_ONLY))


def test_core_imports_and_steps_without_tensorflow() -> None:
    result = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "EXTRA_LOADED []" in result.stdout, result.stdout


def _blocked_program(blocked: tuple[str, ...], body: str) -> str:
    """A program that runs ``body`` with the top-level modules ``blocked`` unimportable.

    ``import`` of a blocked module raises ModuleNotFoundError; ``importlib.util.find_spec``
    still answers (etils asks it whether TensorFlow is installed, and then imports it
    only for cloud paths).
    """
    head = textwrap.dedent(
        f"""
        import importlib.abc, importlib.machinery, sys

        class _Fail(importlib.abc.Loader):
            def create_module(self, spec):
                raise ModuleNotFoundError(f"{{spec.name}} is blocked by the test")

            def exec_module(self, module):
                pass

        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    return importlib.machinery.ModuleSpec(name, _Fail())
                return None

        sys.meta_path.insert(0, _Block())
        """)
    return head + textwrap.dedent(body)


def _run(program: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_training_on_digits_needs_no_tensorflow_tfds_or_clu(tmp_path) -> None:
    """The `train` extra's promise: in-memory training with TensorFlow, TFDS and clu
    unimportable; a TFDS dataset then fails naming the `tfds` extra."""
    program = _blocked_program(("tensorflow", "tensorflow_datasets", "clu"), f"""
        from svdcond_jax.training.config import get_config
        from svdcond_jax.training.loop import train_and_evaluate

        config = get_config()
        config.update(num_train_steps=3, batch_size=16, eval_batch_size=64,
                      max_train_examples=64, max_eval_examples=64, monitor_every_steps=2,
                      log_every_steps=2, progress_bar=False, method="svd+nog+olr")
        summary = train_and_evaluate(config, {str(tmp_path / "run")!r})
        assert summary["steps"] == 3 and summary["complete"], summary
        config.dataset = "cifar10"
        try:
            train_and_evaluate(config, {str(tmp_path / "cifar")!r})
        except ImportError as err:
            print("TFDS_ERROR", err)
        print("LOADED", sorted(m for m in ("tensorflow", "tensorflow_datasets", "clu")
                                if m in sys.modules))
        """)
    result = _run(program)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "LOADED []" in result.stdout, result.stdout
    assert "pip install 'svdcond-jax[tfds]'" in result.stdout, result.stdout
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_training_without_the_train_extra_names_the_install_line() -> None:
    program = _blocked_program(("ml_collections",), """
        try:
            import svdcond_jax.training
        except ImportError as err:
            print("ERROR", err)
        """)
    result = _run(program)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ml_collections" in result.stdout and "svdcond-jax[train]" in result.stdout


# ----------------------------------------------------------------------------- packaging

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("svdcond-demo", "svdcond-run", "svdcond-plot", "svdcond-dbn", "svdcond-gcp",
           "svdcond-launch", "svdcond-conditioning-study")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_and_experiments_install_under_svdcond_jax() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "svdcond_jax").rglob("__init__.py")}
    on_disk |= {"svdcond_jax." + ".".join(p.parent.relative_to(ROOT).parts)
                for p in (ROOT / "experiments").rglob("__init__.py")}
    assert listed == on_disk
    assert setuptools["package-dir"] == {"svdcond_jax.experiments": "experiments"}
    scripts = _pyproject()["project"]["scripts"]
    assert set(scripts) == set(SCRIPTS)
    for target in scripts.values():
        module, _, func = target.partition(":")
        source = ROOT / "experiments" / (module.rsplit(".", 1)[1] + ".py")
        assert f"def {func}()" in source.read_text(), target


def test_extras_split_training_from_tensorflow() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {k: " ".join(v).lower() for k, v in extras.items()}
    assert "tensorflow" not in names["train"] and "clu" not in names["train"]
    assert "ml_collections" in names["train"] and "tensorboard" in names["train"]
    assert "tensorflow-datasets" in names["tfds"] and "svdcond-jax[train]" in names["tfds"]
    assert names["experiments"] == "svdcond-jax[train,tfds]"


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help_from_any_directory(tmp_path, script) -> None:
    path = shutil.which(script, path=str(pathlib.Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--" in result.stdout and not result.stdout.startswith("error")
    if script not in ("svdcond-plot", "svdcond-launch", "svdcond-conditioning-study"):
        assert "Config fields" in result.stdout and "--config.batch_size=" in result.stdout


@pytest.mark.slow
def test_wheel_ships_the_experiments_and_their_configs_under_svdcond_jax(tmp_path) -> None:
    """What `pip install svdcond-jax` would install: nothing named `experiments` at the top
    level, the configs inside the package, the console scripts declared."""
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                             str(tmp_path), str(ROOT)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("svdcond_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "experiments" not in tops and "benchmarks" not in tops and "tests" not in tops
    for config in (ROOT / "experiments" / "configs").glob("*.py"):
        assert f"svdcond_jax/experiments/configs/{config.name}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{script} = svdcond_jax.experiments." in text for script in SCRIPTS)
