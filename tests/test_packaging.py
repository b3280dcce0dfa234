"""The light core: `import svdcond_jax` and a jitted NOG step need no experiment extra."""

import subprocess
import sys
import textwrap

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
