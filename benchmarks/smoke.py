"""The GPU check's smoke: environment, the exact eigh backward, eigh's kernel, digits steps.

Each function runs on jax's default device and returns a JSON-able dict; a ``passed``
entry is the check's verdict. ``benchmarks/gpu_check.py`` (part ``a_smoke``) runs them.
Nothing here imports TensorFlow, TFDS or clu: the digits come from the training library's
in-memory pipeline (scikit-learn's bundled images), the steps from its ``state`` and
``steps`` modules.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from experiments.provenance import cpu_name


def environment() -> dict[str, Any]:
    """Devices, versions (jax, jaxlib, CUDA plugin and libraries, torch), host, settings."""
    import importlib.metadata as md

    import jax

    devices = jax.devices()
    dev = devices[0]
    pattern = re.compile(r"^(jax|jaxlib|jax[-_]cuda.*|nvidia[-_].*|torch|triton|flax|optax|"
                         r"chex|orbax[-_].*|numpy|scipy|scikit[-_]learn|ml[-_]collections|"
                         r"absl[-_]py|tensorboard|tensorflow.*|clu)$", re.IGNORECASE)
    packages = {}
    for dist in md.distributions():
        name = dist.metadata["Name"] or ""
        if pattern.match(name):
            packages[name] = dist.version
    try:
        from jax.extend import backend as jex_backend

        platform_version = jex_backend.get_backend().platform_version
    except Exception as e:  # recorded, not fatal
        platform_version = f"unknown ({type(e).__name__})"
    try:
        env_info = jax.print_environment_info(return_string=True)
    except Exception as e:  # recorded, not fatal
        env_info = f"unavailable ({type(e).__name__}: {e})"
    return {
        "platform": dev.platform, "device_kind": dev.device_kind,
        "device_count": jax.device_count(), "platform_version": platform_version,
        "devices": [{"id": d.id, "kind": d.device_kind,
                     "bytes_limit": (d.memory_stats() or {}).get("bytes_limit")}
                    for d in devices],
        "jax": jax.__version__, "jaxlib": importlib.import_module("jaxlib").__version__,
        "python": platform.python_version(), "packages": dict(sorted(packages.items())),
        "host_cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg(),
        "settings": {k: os.environ.get(k) for k in (
            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS", "OPENBLAS_NUM_THREADS",
            "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")},
        "wheels_on_path": [p for p in sys.path if p.endswith(".whl")],
        "jax_environment_info": env_info,
    }


def check_eigh_backward(shape: tuple[int, int, int]) -> dict[str, Any]:
    """The exact eigh backward (our custom derivative) against float64 finite differences.

    On the default device, in float64 (x64 on for this check only): for P = Q diag(l) Q^T
    with l log-spaced in [0.1, 1] and its two largest eigenvalues equal (where Eq. 7
    divides by zero), a loss L(P) = <W, f(P)> with f = sqrtm, inv_sqrtm
    (``method="eigh", backward="exact"``), and three random symmetric unit directions V:
    the directional derivative <grad L, V> against the central difference
    (L(P + hV) - L(P - hV)) / 2h, h = 1e-5. Its error is ~h^2 |L'''| / 6 + eps |L| / h;
    with eigenvalues >= 0.1 (|d^3 l^(-1/2)| <= 6e3) and |L| <= 1e3 that is <= 1e-7 of
    the derivative, so the check asks for 1e-6. Also the float32 gradient (what training
    uses) against the float64 one, relative Frobenius error <= 1e-3 (kappa(P) = 10).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from svdcond_jax import inv_sqrtm, sqrtm

    b, d, _ = shape
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(b, d, d)))
    lam = np.geomspace(1.0, 0.1, d)
    lam[1] = lam[0]
    p = (q * lam) @ np.swapaxes(q, -1, -2)
    p = (p + np.swapaxes(p, -1, -2)) / 2
    weight = rng.normal(size=(d, d))
    directions = []
    for _ in range(3):
        v = rng.normal(size=p.shape)
        v = v + np.swapaxes(v, -1, -2)
        directions.append(v / np.linalg.norm(v))
    h = 1e-5
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    out: dict[str, Any] = {"shape": list(shape), "h": h, "fd_tolerance": 1e-6,
                           "f32_tolerance": 1e-3, "device": str(jax.devices()[0])}
    try:
        for name, fn in (("sqrtm", sqrtm), ("inv_sqrtm", inv_sqrtm)):
            def loss(a, w, fn=fn):
                return jnp.sum(fn(a, method="eigh", backward="exact") * w)

            value = jax.jit(loss)
            grad = jax.jit(jax.grad(loss))
            p64, w64 = jnp.asarray(p, jnp.float64), jnp.asarray(weight, jnp.float64)
            g64 = np.asarray(grad(p64, w64))
            errors = []
            for v in directions:
                v64 = jnp.asarray(v, jnp.float64)
                fd = (float(value(p64 + h * v64, w64)) - float(value(p64 - h * v64, w64))) / (2 * h)
                ad = float(np.sum(g64 * v))
                errors.append(abs(ad - fd) / max(abs(fd), 1e-300))
            g32 = np.asarray(grad(jnp.asarray(p, jnp.float32), jnp.asarray(weight, jnp.float32)))
            f32_error = float(np.linalg.norm(g32 - g64) / np.linalg.norm(g64))
            out[name] = {"fd_rel_errors": errors, "f32_rel_error": f32_error,
                         "dtype": str(g64.dtype), "finite": bool(np.isfinite(g64).all()),
                         "passed": bool(np.isfinite(g64).all() and max(errors) <= 1e-6
                                        and f32_error <= 1e-3)}
    finally:
        jax.config.update("jax_enable_x64", previous)
    out["passed"] = all(out[n]["passed"] for n in ("sqrtm", "inv_sqrtm"))
    return out


def time_calls(fn: Callable[[], Any], n: int) -> list[float]:
    """Wall times (s) of ``n`` calls of ``fn`` (which blocks until its result is ready)."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _custom_calls(hlo: str) -> list[str]:
    return [line.strip()[:600] for line in hlo.splitlines() if "custom_call_target=" in line]


def eigh_reading(target: str, algorithm: int | None, n: int) -> str:
    """What a (target, algorithm attribute) of jaxlib's eigh lowering means."""
    if target.startswith("lapack_"):
        return f"LAPACK {target.removeprefix('lapack_').removesuffix('_ffi')} on the host CPU"
    if "syevd" not in target:
        return f"unrecognised target {target}"
    # jaxlib's GPU solver kernel (gpu/solver_kernels_ffi.cc): algorithm 0 (default) takes
    # Jacobi (syevj; batched when batch > 1) for n <= 32, else divide and conquer
    # (syevd, one call per matrix); 1 forces syevd, 2 forces syevj.
    if algorithm == 2 or (algorithm == 0 and n <= 32):
        return "cuSOLVER Jacobi (syevj)" + (" [default for n <= 32]" if algorithm == 0 else "")
    if algorithm in (0, 1):
        return ("cuSOLVER divide and conquer (syevd), one call per matrix"
                + (" [default for n > 32]" if algorithm == 0 else ""))
    return f"{target} with algorithm={algorithm}"


def eigh_algorithm(shape: tuple[int, int, int], calls: int) -> dict[str, Any]:
    """Which eigh kernel XLA runs for ``shape`` (compiled HLO), and each one's time.

    ``jnp.linalg.eigh`` is compiled and its custom calls read from the optimised HLO text
    (target name and the ``algorithm`` attribute of jaxlib's GPU lowering); then the
    default, QR (``syevd``) and Jacobi (``syevj``) implementations of
    ``jax.lax.linalg.eigh`` are each timed over ``calls`` calls after one warm-up (an
    implementation the backend refuses, e.g. Jacobi on CPU, is recorded with its error).
    """
    import jax
    import jax.numpy as jnp

    from benchmarks.meta_layer import random_spd

    x = random_spd(shape)
    compiled = jax.jit(jnp.linalg.eigh).lower(x).compile()
    calls_text = _custom_calls(compiled.as_text())
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', "\n".join(calls_text))))
    eigh_calls = [c for c in calls_text if "ev" in c.split("custom_call_target=")[1][:40]]
    algo = None
    for line in eigh_calls:
        match = re.search(r"algorithm\s*=\s*(\d+)", line)
        if match:
            algo = int(match.group(1))
    target = next((t for t in targets if "ev" in t), targets[0] if targets else "none")
    out: dict[str, Any] = {"shape": list(shape), "targets": targets, "algorithm_attr": algo,
                           "custom_calls": calls_text, "reading": eigh_reading(
                               target, algo, shape[-1]), "timings_ms": {}, "errors": {}}
    impl = getattr(jax.lax.linalg, "EighImplementation", None)  # absent: default only
    choices = [("default", None)]
    if impl is not None:
        choices += [("qr", impl.QR), ("jacobi", impl.JACOBI)]
    for name, implementation in choices:
        fn = jax.jit(functools.partial(jax.lax.linalg.eigh, implementation=implementation))
        try:
            jax.block_until_ready(fn(x))
        except Exception as e:  # recorded: e.g. Jacobi is GPU/TPU only
            out["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        times = time_calls(lambda fn=fn: jax.block_until_ready(fn(x)), max(calls, 1))
        out["timings_ms"][name] = 1e3 * statistics.median(times)
    return out


def digits_steps(n: int, batch: int) -> dict[str, Any]:
    """``svd+nog+olr`` train steps of the digits demo's TinyResNet on the real digits.

    The demo's config (``experiments/configs/digits_demo.py``: TinyResNet with 16 filters
    on one grey 8x8 channel, decorrelated BN stem with eps 1e-2, SGD lr 0.1, momentum 0.9,
    weight decay 5e-4; its first fold), the training library's in-memory input pipeline
    (augmented batches of ``batch``, epoch after epoch) and its jitted ``train_step``
    (non-finite steps are skipped and counted). Passes when no step was non-finite.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.configs import digits_demo
    from svdcond_jax.training import input_pipeline, steps
    from svdcond_jax.training import state as state_lib

    config = digits_demo.get_config()
    config.method = "svd+nog+olr"
    start = time.perf_counter()
    data = input_pipeline.load_data(config)
    setup = state_lib.create_setup(config, num_classes=data.num_classes,
                                   steps_per_epoch=data.train.train_steps(batch))
    st = state_lib.create_train_state(jax.random.key(0, impl=config.prng_impl), setup,
                                      (data.image_size, data.image_size, 3))
    step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=setup.learning_rate_fn,
                                     ol_coeff=setup.ol_coeff, ol_pattern=setup.pre_svd_pattern),
                   donate_argnums=0)
    losses, finite = [], []
    first_s = None
    epoch = 0
    while len(losses) < n:
        for b in input_pipeline.train_batches(data, batch_size=batch, seed=0, epoch=epoch):
            st, metrics = step(st, {"image": jnp.asarray(b["image"]),
                                    "label": jnp.asarray(b["label"])})
            losses.append(float(metrics["loss"]))
            finite.append(bool(metrics["finite"]))
            if first_s is None:
                first_s = time.perf_counter() - start
            if len(losses) == n:
                break
        epoch += 1
    total = time.perf_counter() - start
    non_finite = finite.count(False)
    return {"method": "svd+nog+olr", "model": config.model, "num_filters": config.num_filters,
            "steps": n, "batch": batch, "train_examples": data.train.num_examples,
            "losses": losses, "non_finite_steps": non_finite,
            "svd_failures": int(st.svd_failures), "first_step_s": first_s,
            "steps_after_first_s": total - first_s,
            "passed": non_finite == 0 and bool(np.isfinite(losses).all())}
