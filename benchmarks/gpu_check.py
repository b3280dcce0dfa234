"""The GPU check: correctness smoke and performance parts that fit one GPU loan.

On the GPU machine, from the root of a plain checkout (nothing pip-installed; the image
has jax with its CUDA plugin, flax, optax, chex, orbax-checkpoint, absl-py,
scikit-learn and PyTorch, and no TensorFlow, TFDS, clu or ml_collections)::

    python -m benchmarks.gpu_check --budget_s 540 --out benchmarks/results/gpu_check

Before that, on a machine with a package registry, put the carried wheels in ``wheels/``
(``python -m benchmarks.carry_wheels``: ml_collections 1.1.0, pure Python, 75 KiB). The
check puts every pure-Python wheel of ``--wheels`` (default ``wheels/``) on its own
``sys.path`` and its workers' ``PYTHONPATH`` (Python imports a pure-Python wheel straight
from the zip file), so nothing is installed and no registry is needed. Without the
wheel, the parts that need the training library (digits steps, Table 6, PyTorch
comparison, MFU) are recorded as skipped with that reason; the rest runs.

The CPU dry run (every part's code path at tiny sizes; about 2 minutes on 2 cores)::

    python -m benchmarks.gpu_check --tiny --budget_s 240 --out /tmp/gpu_check

``--plan`` prints each part's estimate from the priors below without running anything.

The parts, in priority order (``--parts a,b,...`` selects by key or key prefix; the
order stays this one):

* ``a_smoke``: environment (devices, jax/jaxlib/CUDA versions, device kind), the exact
  eigh backward against float64 finite differences on the device, which eigh algorithm
  XLA picks for (256, 256, 256) and (1, 64, 64), 30 digits steps of ``svd+nog+olr``.
* ``b_table6_core``: Table 6's ``bn``, ``svd``, ``svd+nog+olr``, ``svd+nog+ow+olr`` at
  batch 128, float32, with the three overhead targets.
* ``c_meta_layer``: every meta-layer method on (256, 256, 256) and (1, 64, 64) against
  ``torch.linalg.eigh`` with autograd on the same GPU.
* ``d_torch_step``: our step against PyTorch eager and ``torch.compile``, ``bn`` and ``svd``.
* ``e_mfu``: MFU of the ``bn`` step in bfloat16 at batch 1024.
* ``f1_table6_f32``, ``f2_table6_bf16_core``, ``f3_table6_bf16``: all of Table 6 in
  float32, then the core rows and all rows in bfloat16.

Budget: ``--budget_s`` counts from the start of the process (imports and device start
included). Before each part (and before each method row inside a part) its cost is
estimated from its compile count and sizes; what would not fit in the time left is
skipped and recorded as ``skipped: estimated X s > Y s left``, and later, cheaper parts
still run (part d starts when its first row fits). The estimates start from the priors
of :class:`Costs` (GPU: reasoned from the step's size, see there; CPU dry run: measured
on the 2-core development machine) and are replaced by this run's own measurements as
soon as it has them (the first ResNet compile, the eigh call times, the step time, the
first PyTorch row). A watchdog
ends the process cleanly at the budget even if an estimate was wrong: the running part is
recorded as ``interrupted``, the summary is written and this process's workers are killed.

A GPU loan is 15 minutes including the machine's start (1-3 minutes), at most 10 minutes
per command, so ``--budget_s 540`` is one command. With the GPU priors (``--plan``) the
default run covers parts a, b, c and e (~470 s with start-up) and skips d (~410 s) and
f; ``--parts d`` and ``--parts f`` are the next loans' commands.

Outputs, in ``--out``: ``<part>.json`` the moment each part ends (status ``ok``,
``failed`` (a correctness check failed), ``error`` (an exception; traceback kept),
``skipped`` or ``interrupted``; its estimate and its measured time), then
``summary.json`` and ``summary.md`` (rendered by ``benchmarks/render.py``). Exit status 1
when a part failed or raised, else 0.

Process settings: ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless set; jax must share
the GPU with PyTorch and with the worker processes of part d), jax's persistent
compilation cache in a fresh temporary directory (so every compile time reported is
cold, and a step compiled once, e.g. by part b, is loaded rather than compiled again by
part d's workers and part f), ``OPENBLAS_NUM_THREADS=1`` (unless set; the CPU eigh,
docs/performance.md). TensorFlow, TFDS and clu are never imported: the check uses the
training library's ``config``, ``state``, ``steps`` and in-memory ``input_pipeline``
modules, never its loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import smoke

_START = time.monotonic()  # the budget counts from here (module import = process start)
ROOT = Path(__file__).resolve().parent.parent

CORE_METHODS = ("bn", "svd", "svd+nog+olr", "svd+nog+ow+olr")
# Table 6 in its order (experiments/step_timing.py TABLE6_METHODS; kept here so that the
# plan needs no import of the training library).
TABLE6_METHODS = ("bn", "svd", "svd+nog", "svd+olr", "svd+nog+olr", "svd+ow",
                  "svd+nog+ow+olr", "newton_schulz")
EIGH_SHAPES = ((256, 256, 256), (1, 64, 64))
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets; the
# first entry whose key is a substring of jax's lower-cased device_kind wins.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.5),
    ("h200 nvl", 835.5),
    ("h100", 989.4),  # SXM5 (device_kind "NVIDIA H100 80GB HBM3")
    ("h200", 989.4),
    ("a100", 312.0),
    ("l40s", 362.1),
    ("l4", 121.0),
)
MISSING_TRAINING = ("the training library does not import ({error}); on the GPU image put "
                    "the carried wheels in wheels/ (python -m benchmarks.carry_wheels)")


def peak_bf16_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of a known device kind (:data:`PEAK_BF16_TFLOPS`), else None."""
    kind = device_kind.lower()
    return next((v for k, v in PEAK_BF16_TFLOPS if k in kind), None)


# --------------------------------------------------------------------------------------
# Sizes and costs


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the parts use: the GPU run's, or the CPU dry run's (``--tiny``)."""

    model: str
    batch: int
    image_size: int
    num_classes: int
    mfu_batch: int
    core_methods: tuple[str, ...]  # part b and f2
    table6_methods: tuple[str, ...]  # parts f1 and f3
    torch_methods: tuple[str, ...]  # part d's rows
    meta_shapes: tuple[tuple[int, int, int], ...]  # part c
    eigh_shapes: tuple[tuple[int, int, int], ...]  # part a: which algorithm, timed
    fd_shape: tuple[int, int, int]  # part a: finite differences
    digits_steps: int
    digits_batch: int
    eigh_calls: int  # timed calls per eigh implementation
    repeats: int  # timed calls per interleaved round (Table 6, MFU)
    rounds: int
    meta_repeats: int
    torch_rounds: int
    torch_steps: int
    compile_backend: str  # torch.compile's backend in part d


GPU_SIZES = Sizes(
    model="CifarResNet50", batch=128, image_size=32, num_classes=100, mfu_batch=1024,
    core_methods=CORE_METHODS, table6_methods=TABLE6_METHODS, torch_methods=("bn", "svd"),
    meta_shapes=EIGH_SHAPES, eigh_shapes=EIGH_SHAPES, fd_shape=(4, 16, 16),
    digits_steps=30, digits_batch=128, eigh_calls=5, repeats=10, rounds=3, meta_repeats=5,
    torch_rounds=3, torch_steps=5, compile_backend="inductor")
# The dry run: TinyResNet at batch 8, two Table 6 rows (one more in f1/f3), one PyTorch
# row, torch.compile without inductor's C++/Triton code generation.
TINY_SIZES = Sizes(
    model="TinyResNet", batch=8, image_size=8, num_classes=10, mfu_batch=16,
    core_methods=("bn", "svd"), table6_methods=("bn", "svd", "svd+nog+olr"),
    torch_methods=("bn",), meta_shapes=((4, 16, 16), (1, 8, 8)),
    eigh_shapes=((8, 64, 64), (1, 64, 64)), fd_shape=(2, 6, 6), digits_steps=6,
    digits_batch=32, eigh_calls=1, repeats=2, rounds=1, meta_repeats=2, torch_rounds=1,
    torch_steps=1, compile_backend="aot_eager")


@dataclasses.dataclass
class Costs:
    """What the estimates are made of, in seconds; priors until this run measures them.

    GPU priors (one H100/H200, 16 host cores; reasoned, not yet measured on that machine;
    every part's JSON records what it measured, so the next revision can replace them):

    * ``first_method_compile`` 75: forward + train step of the CIFAR ResNet-50, the first
      of its precision and batch in the process. The optimised step is ~54k lines of HLO
      (29 s to compile on 2 CPU cores, docs/performance.md); on the GPU XLA also
      autotunes every distinct convolution (~50 shapes x forward, input and weight
      gradients) by running cuDNN's algorithms; ~60 s for the step, ~15 s for the forward.
    * ``method_compile`` 45: another method's forward + step in the same process: XLA
      keeps its autotuning results in memory, so only code generation remains.
    * ``cache_load`` 5: forward + step loaded from the persistent compilation cache.
    * ``small_compile`` 2: one meta-layer or eigh function.
    * ``digits_compile`` 20: init + train step of the digits TinyResNet.
    * ``step_s`` 0.05: one float32 step at batch 128 (~1 TFLOP at >= 20 TFLOP/s).
    * ``worker_start`` 15: a worker process: interpreter, jax or torch import, CUDA context.
    * ``torch_compile`` 150: the first ``torch.compile`` step of the ResNet-50 (TorchDynamo
      and AOTAutograd traces of forward and backward, then a few hundred Triton kernels
      compiled on 16 threads).
    * eigh: one 256 x 256 float32 cuSOLVER ``syevd`` ~4 ms (latency bound: many small
      kernels), one 64 x 64 ~1 ms; the default eigh of a batch loops over its matrices
      (part a records which kernel runs), so (256, 256, 256) ~1 s per call.

    CPU dry-run priors: measured on the 2-core development machine under load (TinyResNet
    forward + step 10-26 s, ``aot_eager`` first step 3-6 s).
    """

    first_method_compile: float
    method_compile: float
    cache_load: float
    small_compile: float
    digits_compile: float
    step_s: float
    worker_start: float
    torch_compile: float
    eigh_matrix_s: Callable[[int], float]  # one d x d float32 eigh (prior)
    eigh_scale: float = 1.0  # measured / prior eigh time (part a)

    def eigh_call_s(self, shape: Sequence[int]) -> float:
        """One ``jnp.linalg.eigh`` call on a (batch, d, d) float32 array."""
        return self.eigh_scale * shape[0] * self.eigh_matrix_s(shape[-1])


def gpu_costs() -> Costs:
    """The GPU priors (see :class:`Costs`)."""
    return Costs(first_method_compile=75.0, method_compile=45.0, cache_load=5.0,
                 small_compile=2.0, digits_compile=20.0, step_s=0.05, worker_start=15.0,
                 torch_compile=150.0,
                 eigh_matrix_s=lambda d: 1e-3 + 3e-3 * (d / 256) ** 2)


def tiny_costs() -> Costs:
    """The CPU dry run's priors (see :class:`Costs`)."""
    return Costs(first_method_compile=20.0, method_compile=15.0, cache_load=3.0,
                 small_compile=0.7, digits_compile=15.0, step_s=0.05, worker_start=8.0,
                 torch_compile=10.0,
                 eigh_matrix_s=lambda d: 1e-4 + 2e-2 * (d / 256) ** 3)


# --------------------------------------------------------------------------------------
# The run's state


class Skip(Exception):
    """Raised by a part that cannot run here (a missing package, no GPU): recorded, no error."""


@dataclasses.dataclass
class Context:
    """What the parts share: sizes, costs, the deadline, what is compiled, the output."""

    sizes: Sizes
    costs: Costs
    deadline: float  # time.monotonic() by which every part must have ended
    out: Path
    tiny: bool
    torch_device: str = "cpu"
    platform: str = "cpu"
    compiled: set[tuple[str, str, int]] = dataclasses.field(default_factory=set)
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()

    def fits(self, seconds: float) -> str | None:
        """None if ``seconds`` fit in the time left, else the reason to skip."""
        left = self.left()
        return None if seconds <= left else f"estimated {seconds:.0f} s > {left:.0f} s left"

    def build_s(self, kind: str) -> float:
        """Estimated seconds to build one method's forward and step (see :func:`build_kind`)."""
        return {"cached": self.costs.cache_load, "more": self.costs.method_compile,
                "first": self.costs.first_method_compile}[kind]


def build_kind(compiled: set[tuple[str, str, int]], key: tuple[str, str, int]) -> str:
    """How a (method, precision, batch) step gets built given what ``compiled`` holds.

    "cached": compiled before in this process, so jax's persistent cache loads it;
    "more": another method of the same precision and batch was compiled, whose
    convolutions XLA has autotuned already; "first": a cold compile.
    """
    if key in compiled:
        return "cached"
    if any(p == key[1] and b == key[2] for _, p, b in compiled):
        return "more"
    return "first"


class Part(NamedTuple):
    """One part of the check: ``run(ctx) -> result``, ``estimate(ctx) -> (s, formula)``.

    A part starts when its estimate fits in the time left, or, with ``minimum``, when that
    much fits: a part whose rows are checked one by one as it runs (part d) starts when
    its first row fits.
    """

    key: str
    title: str
    run: Callable[[Context], dict[str, Any]]
    estimate: Callable[[Context], tuple[float, str]]
    minimum: Callable[[Context], float] | None = None


# --------------------------------------------------------------------------------------
# Helpers


def _training_error() -> str | None:
    """None if the training library (state, steps, config) imports, else why not."""
    try:
        importlib.import_module("svdcond_jax.training.steps")
        importlib.import_module("svdcond_jax.training.config")
    except ImportError as e:
        return MISSING_TRAINING.format(error=f"{type(e).__name__}: {e}")
    return None


def _require_training() -> None:
    error = _training_error()
    if error:
        raise Skip(error)


def _torch_error(device: str) -> str | None:
    """None if PyTorch imports and has ``device``, else why not."""
    try:
        import torch
    except ImportError as e:
        return f"PyTorch does not import ({type(e).__name__}: {e})"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return (f"PyTorch {torch.__version__} sees no CUDA device (jax runs on the GPU; a "
                "CPU PyTorch is no comparison)")
    return None


def _step_timing() -> Any:
    from experiments import step_timing

    return step_timing


def _median_ms(times: Sequence[float]) -> float:
    return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------------------
# Part a: environment and correctness smoke


def run_smoke(ctx: Context) -> dict[str, Any]:
    """Part a: environment, exact eigh backward vs finite differences, eigh algorithm, digits.

    Estimate on the GPU: ~67 s. 14 small compiles at 2 s (2 functions x 3 for the finite
    differences; per eigh shape, ``jnp.linalg.eigh`` for its HLO and the 3 timed
    implementations), those implementations called 1 + 5 times on both shapes (~1 s per
    (256, 256, 256) call: 18 s), the digits step's compile (20 s) and 30 steps.
    """
    out: dict[str, Any] = {"environment": smoke.environment()}
    ctx.log(f"a: {out['environment']['platform']} {out['environment']['device_kind']}, "
            f"jax {out['environment']['jax']}")
    start = time.monotonic()
    out["eigh_backward"] = smoke.check_eigh_backward(ctx.sizes.fd_shape)
    ctx.costs.small_compile = (time.monotonic() - start) / 6  # 6 compiles, a few calls
    ctx.log(f"a: exact eigh backward vs finite differences: "
            f"{'passed' if out['eigh_backward']['passed'] else 'FAILED'}")
    out["eigh_algorithm"], scales = [], []
    for shape in ctx.sizes.eigh_shapes:
        row = smoke.eigh_algorithm(shape, ctx.sizes.eigh_calls)
        out["eigh_algorithm"].append(row)
        ctx.log(f"a: eigh {shape}: {row['targets']} -> {row['reading']}; "
                f"{ {k: round(v, 3) for k, v in row['timings_ms'].items()} } ms")
        if "default" in row["timings_ms"]:
            prior = shape[0] * ctx.costs.eigh_matrix_s(shape[-1])
            scales.append(1e-3 * row["timings_ms"]["default"] / prior)
    if scales:  # part c's estimate: the eigh cost model scaled by what was measured
        ctx.costs.eigh_scale = max(scales)
    error = _training_error()
    if error:
        out["digits"] = {"skipped": error}
    else:
        out["digits"] = d = smoke.digits_steps(ctx.sizes.digits_steps, ctx.sizes.digits_batch)
        ctx.costs.digits_compile = d["first_step_s"]
        ctx.log(f"a: {d['steps']} digits steps of svd+nog+olr: loss {d['losses'][0]:.3f} -> "
                f"{d['losses'][-1]:.3f}, {d['non_finite_steps']} non-finite")
    checks = [out["eigh_backward"]["passed"], out["digits"].get("passed", True)]
    out["passed"] = all(checks)
    return out


def estimate_smoke(ctx: Context) -> tuple[float, str]:
    s, c = ctx.sizes, ctx.costs
    fd = 6 * c.small_compile
    eigh = sum(4 * c.small_compile + 3 * (1 + s.eigh_calls) * c.eigh_call_s(shape)
               for shape in s.eigh_shapes)
    digits = c.digits_compile + s.digits_steps * 0.02
    return fd + eigh + digits, (f"finite differences 6 x {c.small_compile:.1f} s + eigh "
                                f"{eigh:.0f} s + digits {c.digits_compile:.0f} s compile + "
                                f"{s.digits_steps} steps")


# --------------------------------------------------------------------------------------
# Table 6 rows (parts b and f)


def table6_rows(ctx: Context, methods: Sequence[str], precision: str) -> dict[str, Any]:
    """Table 6 rows of ``methods``: forward, step, backward (= step - forward), ratios.

    The protocol of ``experiments/step_timing.py`` (``build_steps``: the training
    library's jitted forward and train step, compiled ahead of time on a fixed random
    batch; two warm-up calls each; medians over ``rounds x repeats`` timed calls, the
    methods interleaved round by round), with a budget check before each method: a method
    whose build plus its share of the timing would not fit is dropped and recorded.
    """
    step_timing = _step_timing()
    s = ctx.sizes
    built: dict[str, Any] = {}
    dropped, cached = [], []
    per_method_timing = (2 + s.rounds * s.repeats) * 1.4 * ctx.costs.step_s
    for m in methods:
        key = (m, precision, s.batch)
        kind = build_kind(ctx.compiled, key)
        reason = ctx.fits(ctx.build_s(kind) + per_method_timing * (len(built) + 1))
        if reason:
            dropped.append({"method": m, "reason": reason})
            ctx.log(f"  {m} ({precision}): skipped: {reason}")
            continue
        b = step_timing.build_steps(m, model=s.model, batch=s.batch, image_size=s.image_size,
                                    num_classes=s.num_classes, precision=precision)
        for fn in b[:2]:
            fn()
            fn()
        ctx.compiled.add(key)
        # The next estimates use what this build took.
        setattr(ctx.costs, {"cached": "cache_load", "more": "method_compile",
                            "first": "first_method_compile"}[kind], b.compile_s)
        if kind == "cached":
            cached.append(m)
        built[m] = b
        ctx.log(f"  {m} ({precision}): {'loaded' if kind == 'cached' else 'compiled'} in "
                f"{b.compile_s:.1f} s")
    fp: dict[str, list[float]] = {m: [] for m in built}
    step: dict[str, list[float]] = {m: [] for m in built}
    for _ in range(s.rounds):
        for m, b in built.items():
            fp[m] += smoke.time_calls(b.forward, s.repeats)
            step[m] += smoke.time_calls(b.step, s.repeats)
    peak = _device_peak_mb()
    results = {}
    for m, b in built.items():
        f, st = _median_ms(fp[m]), _median_ms(step[m])
        results[m] = {"fp_ms": f, "step_ms": st, "bp_ms": st - f, "fp_min_ms": 1e3 * min(fp[m]),
                      "step_min_ms": 1e3 * min(step[m]), "compile_s": b.compile_s,
                      "from_cache": m in cached,
                      "step_gflops": None if b.step_flops is None else b.step_flops / 1e9,
                      "step_tflops_per_s": None if b.step_flops is None
                      else b.step_flops / st / 1e9,
                      "step_memory_mb": None if b.step_memory_bytes is None
                      else b.step_memory_bytes / 2**20,
                      "peak_memory_mb": peak}
    if precision == "f32" and "bn" in results:
        ctx.costs.step_s = results["bn"]["step_ms"] / 1e3
    built.clear()  # frees the states and executables before the next part
    return {"model": s.model, "batch": s.batch, "image_size": s.image_size,
            "num_classes": s.num_classes, "precision": precision, "rounds": s.rounds,
            "repeats": s.repeats, "results": results,
            "targets": step_timing.overheads(results), "dropped": dropped,
            "paper_ms": {m: step_timing.PAPER_MS[m] for m in results
                         if m in step_timing.PAPER_MS}}


def _device_peak_mb() -> float | None:
    import jax

    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _estimate_rows(ctx: Context, methods: Sequence[str], precision: str) -> tuple[float, str]:
    s, c = ctx.sizes, ctx.costs
    seen = set(ctx.compiled)  # builds in order, the way table6_rows does them
    build = []
    for m in methods:
        build.append(ctx.build_s(build_kind(seen, (m, precision, s.batch))))
        seen.add((m, precision, s.batch))
    timing = len(methods) * (2 + s.rounds * s.repeats) * 1.4 * c.step_s
    return sum(build) + timing, (" + ".join(f"{b:.0f}" for b in build)
                                 + f" s builds + {timing:.0f} s timing")


def run_table6_core(ctx: Context) -> dict[str, Any]:
    """Part b: Table 6's core rows at batch 128, float32, and the three overhead targets.

    Estimate on the GPU: ~219 s. 4 methods x forward + step: the first cold (75 s: XLA
    autotunes every convolution), three reusing the autotuning (45 s each), then
    4 x (2 + 3 x 10) x (forward + step ~1.4 x 50 ms) = 9 s of timing.
    """
    _require_training()
    return table6_rows(ctx, ctx.sizes.core_methods, "f32")


def run_table6_f32(ctx: Context) -> dict[str, Any]:
    """Part f1: all of Table 6 in float32, one interleaved run (part b's rows are loaded).

    Estimate on the GPU: ~218 s after part b (4 x 5 s loads + 4 x 45 s compiles + 18 s
    timing).
    """
    _require_training()
    return table6_rows(ctx, ctx.sizes.table6_methods, "f32")


def run_table6_bf16_core(ctx: Context) -> dict[str, Any]:
    """Part f2: Table 6's core rows in bfloat16 (convs, matmuls, norms; the meta-layer f32).

    Estimate on the GPU: ~219 s (as part b: bf16 convolutions are autotuned anew).
    """
    _require_training()
    return table6_rows(ctx, ctx.sizes.core_methods, "bf16")


def run_table6_bf16(ctx: Context) -> dict[str, Any]:
    """Part f3: all of Table 6 in bfloat16 (part f2's rows are loaded).

    Estimate on the GPU: ~218 s after part f2 (as f1).
    """
    _require_training()
    return table6_rows(ctx, ctx.sizes.table6_methods, "bf16")


# --------------------------------------------------------------------------------------
# Part c: meta-layer against torch.linalg.eigh


def run_meta_layer(ctx: Context) -> dict[str, Any]:
    """Part c: every meta-layer method, forward and forward+backward, vs torch.linalg.eigh.

    ``benchmarks/meta_layer.py`` on (256, 256, 256) and (1, 64, 64): the eigh methods
    (exact and Taylor backward, plain autodiff), Newton-Schulz and Pade, interleaved with
    ``torch.linalg.eigh`` + autograd on the same device (skipped with the reason when
    PyTorch or its CUDA is missing).

    Estimate on the GPU: ~94 s. 2 shapes x 5 methods x 2 functions = 20 small compiles
    (2 s) and (5 + 1) rounds of 8 eigh-based calls per shape (~1 s each at
    (256, 256, 256): 49 s), plus 5 s to import PyTorch.
    """
    from benchmarks import meta_layer

    reason = _torch_error(ctx.torch_device)
    shapes = [tuple(s) for s in ctx.sizes.meta_shapes]
    rows = meta_layer.run(shapes, ctx.sizes.meta_repeats, torch=reason is None,
                          torch_device=ctx.torch_device)
    out: dict[str, Any] = {"rows": rows, "repeats": ctx.sizes.meta_repeats,
                           "torch_device": ctx.torch_device}
    if reason:
        out["torch_skipped"] = reason
    else:
        import torch

        out["torch"] = torch.__version__
    return out


def estimate_meta_layer(ctx: Context) -> tuple[float, str]:
    c, s = ctx.costs, ctx.sizes
    compiles = len(s.meta_shapes) * 10 * c.small_compile
    calls = sum((s.meta_repeats + 1) * 8 * c.eigh_call_s(shape) for shape in s.meta_shapes)
    return compiles + calls + 5, (f"{len(s.meta_shapes) * 10} x {c.small_compile:.1f} s "
                                  f"compiles + {calls:.0f} s eigh calls + 5 s torch import")


# --------------------------------------------------------------------------------------
# Part d: our step against PyTorch


def _torch_row_s(ctx: Context, method: str) -> float:
    """A row's estimate: three worker starts, our build, the first torch.compile, timing.

    Our worker is a fresh process: it loads the step when this process compiled it (part
    b), else compiles it cold.
    """
    c, s = ctx.costs, ctx.sizes
    ours = c.cache_load if (method, "f32", s.batch) in ctx.compiled else c.first_method_compile
    timing = (2 + s.torch_rounds * s.torch_steps) * 3 * 2 * c.step_s
    return 3 * c.worker_start + ours + c.torch_compile + timing


def run_torch_step(ctx: Context) -> dict[str, Any]:
    """Part d: our jitted step against PyTorch eager and torch.compile, ``bn`` and ``svd``.

    ``benchmarks/step_vs_torch.py``: one worker process per (row, column), interleaved
    rounds (3 x 5 steps), PyTorch on the same GPU; our workers load the step from the
    persistent cache when part b compiled it; inductor compiles on all host cores. The
    part starts when its first row fits; a later row that would not fit is skipped
    (recorded).

    Estimate on the GPU: ~410 s after part b. Per row (205 s): three worker starts
    (15 s), our step loaded from the cache (5 s), the first torch.compile step (150 s)
    and (2 + 15) steps x 3 columns at ~100 ms. After the first row the second is
    estimated from the first's measured time.
    """
    _require_training()
    reason = _torch_error(ctx.torch_device)
    if reason:
        raise Skip(reason)
    from benchmarks import step_vs_torch

    s = ctx.sizes
    args = step_vs_torch.parse_args([
        "--methods", ",".join(s.torch_methods), "--columns", "ours,torch,torch-compile",
        "--model", s.model, "--batch", str(s.batch), "--image_size", str(s.image_size),
        "--num_classes", str(s.num_classes), "--precision", "f32",
        "--device", ctx.torch_device, "--rounds", str(s.torch_rounds),
        "--steps", str(s.torch_steps), "--compile_threads", str(os.cpu_count() or 1),
        "--compile_backend", s.compile_backend, "--cache"])

    last_start: list[float] = []

    def skip_row(method: str) -> str | None:
        # After the first row, the next one (svd: same network, ZCA stem) is estimated
        # from the first's measured wall time, 10% up.
        now = time.monotonic()
        est = 1.1 * (now - last_start[-1]) if last_start else _torch_row_s(ctx, method)
        reason = ctx.fits(est)
        if reason is None:
            last_start.append(now)
        return reason

    report = step_vs_torch.run(args, lambda text: ctx.log(f"  {text}"), skip_row=skip_row)
    for row in report["rows"]:
        c = row["columns"]
        faster = min((c[k]["step_s"] for k in ("torch", "torch-compile") if k in c),
                     default=None)
        row["speedup_vs_faster_torch"] = (None if faster is None or "ours" not in c
                                          else faster / c["ours"]["step_s"])
    report["compile_backend"] = s.compile_backend
    return report


def estimate_torch_step(ctx: Context) -> tuple[float, str]:
    rows = [_torch_row_s(ctx, m) for m in ctx.sizes.torch_methods]
    return sum(rows), " + ".join(f"{r:.0f}" for r in rows) + " s per row"


# --------------------------------------------------------------------------------------
# Part e: MFU


def run_mfu(ctx: Context) -> dict[str, Any]:
    """Part e: model FLOP utilisation of the ``bn`` step in bfloat16 at batch 1024.

    FLOPs per step from XLA's cost analysis of the compiled step (it counts cuDNN
    convolutions and cuBLAS matmuls from their shapes), divided by the median step time
    (``rounds x repeats`` calls after two warm-ups) and by the device's dense bf16 peak
    (:data:`PEAK_BF16_TFLOPS`; None for an unknown device or a CPU).

    Estimate on the GPU: ~88 s: the step's cold compile (75 s: bf16 convolutions at a
    new batch are autotuned anew) and 32 steps at 8x the batch-128 step (0.4 s).
    """
    _require_training()
    import jax

    step_timing = _step_timing()
    s = ctx.sizes
    b = step_timing.build_steps("bn", model=s.model, batch=s.mfu_batch,
                                image_size=s.image_size, num_classes=s.num_classes,
                                precision="bf16", with_forward=False)
    ctx.compiled.add(("bn", "bf16", s.mfu_batch))
    b.step()
    b.step()
    times = smoke.time_calls(b.step, s.rounds * s.repeats)
    step_s = statistics.median(times)
    dev = jax.devices()[0]
    peak = None if dev.platform == "cpu" else peak_bf16_tflops(dev.device_kind)
    achieved = None if b.step_flops is None else b.step_flops / step_s / 1e12
    return {"method": "bn", "precision": "bf16", "batch": s.mfu_batch, "model": s.model,
            "compile_s": b.compile_s, "step_ms": 1e3 * step_s, "step_min_ms": 1e3 * min(times),
            "step_gflops": None if b.step_flops is None else b.step_flops / 1e9,
            "achieved_tflops": achieved, "device_kind": dev.device_kind,
            "peak_bf16_tflops": peak,
            "mfu": None if peak is None or achieved is None else achieved / peak,
            "images_per_s": s.mfu_batch / step_s,
            "step_memory_mb": None if b.step_memory_bytes is None
            else b.step_memory_bytes / 2**20, "peak_memory_mb": _device_peak_mb()}


def estimate_mfu(ctx: Context) -> tuple[float, str]:
    c, s = ctx.costs, ctx.sizes
    timing = (2 + s.rounds * s.repeats) * c.step_s * s.mfu_batch / s.batch
    return c.first_method_compile + timing, (f"{c.first_method_compile:.0f} s compile + "
                                             f"{timing:.0f} s timing")


PARTS: tuple[Part, ...] = (
    Part("a_smoke", "environment and correctness smoke", run_smoke, estimate_smoke),
    Part("b_table6_core", "Table 6 core rows, float32", run_table6_core,
         lambda ctx: _estimate_rows(ctx, ctx.sizes.core_methods, "f32")),
    Part("c_meta_layer", "meta-layer vs torch.linalg.eigh", run_meta_layer,
         estimate_meta_layer),
    Part("d_torch_step", "our step vs PyTorch eager and torch.compile", run_torch_step,
         estimate_torch_step, lambda ctx: _torch_row_s(ctx, ctx.sizes.torch_methods[0])),
    Part("e_mfu", "MFU of the bn step, bfloat16", run_mfu, estimate_mfu),
    Part("f1_table6_f32", "Table 6, all rows, float32", run_table6_f32,
         lambda ctx: _estimate_rows(ctx, ctx.sizes.table6_methods, "f32")),
    Part("f2_table6_bf16_core", "Table 6 core rows, bfloat16", run_table6_bf16_core,
         lambda ctx: _estimate_rows(ctx, ctx.sizes.core_methods, "bf16")),
    Part("f3_table6_bf16", "Table 6, all rows, bfloat16", run_table6_bf16,
         lambda ctx: _estimate_rows(ctx, ctx.sizes.table6_methods, "bf16")),
)
NEEDS_ACCELERATOR = ("b_table6_core", "c_meta_layer", "d_torch_step", "e_mfu",
                     "f1_table6_f32", "f2_table6_bf16_core", "f3_table6_bf16")


# --------------------------------------------------------------------------------------
# The runner


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return repr(x)


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable, allow_nan=True) + "\n")
    os.replace(tmp, path)


def skipped_inside(result: Any) -> list[dict[str, str]]:
    """What a part that ran left out: Table 6 or PyTorch rows, the torch column, digits."""
    if not isinstance(result, dict):
        return []
    out = [{"item": r["method"], "reason": r["reason"]}
           for r in result.get("dropped", []) + result.get("skipped_rows", [])]
    if "torch_skipped" in result:
        out.append({"item": "torch", "reason": result["torch_skipped"]})
    if "skipped" in result.get("digits", {}):
        out.append({"item": "digits", "reason": result["digits"]["skipped"]})
    return out


def _children() -> list[int]:
    """PIDs of this process's child processes (its workers), from /proc."""
    pids = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return pids


class Runner:
    """Runs the parts in order within the budget; writes each part's JSON as it ends."""

    def __init__(self, ctx: Context, parts: Sequence[Part], header: dict[str, Any],
                 hard_deadline: float, cleanup: Callable[[], None]):
        self.ctx, self.parts, self.header = ctx, parts, header
        self.records: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.current: dict[str, Any] | None = None
        self.lock = threading.RLock()
        self.cleanup = cleanup
        self.done = False
        self.watchdog = threading.Timer(max(hard_deadline - time.monotonic(), 0.0),
                                        self._on_budget)
        self.watchdog.daemon = True

    def _record(self, part: Part, **fields: Any) -> dict[str, Any]:
        return {"part": part.key, "title": part.title, **fields}

    def _finish_part(self, record: dict[str, Any], result: Any = None) -> None:
        with self.lock:
            if self.done:  # the watchdog has written the summary and is exiting
                return
            self.current = None
            self.records.append(record)
            self.results[record["part"]] = result
            write_json(self.ctx.out / f"{record['part']}.json", {**record, "result": result})
        self.ctx.log(f"{record['part']}: {record['status']}"
                     + (f" ({record['reason']})" if record.get("reason") else "")
                     + (f" in {record['seconds']:.1f} s" if "seconds" in record else ""))

    def run(self) -> int:
        """Runs every part; returns the exit status (1 if a part failed or raised)."""
        self.watchdog.start()
        no_device = (not self.ctx.tiny and self.ctx.platform == "cpu")
        for part in self.parts:
            est, formula = part.estimate(self.ctx)
            base = {"estimate_s": est, "estimate": formula,
                    "started_s": time.monotonic() - _START}
            if no_device and part.key in NEEDS_ACCELERATOR:
                reason = "jax's backend is the CPU (no GPU found); --tiny runs on CPU"
                self._finish_part(self._record(part, status="skipped", reason=reason, **base))
                continue
            reason = self.ctx.fits(part.minimum(self.ctx) if part.minimum else est)
            if reason:
                self._finish_part(self._record(part, status="skipped", reason=reason, **base))
                continue
            self.ctx.log(f"{part.key}: {part.title} (estimate {est:.0f} s: {formula}; "
                         f"{self.ctx.left():.0f} s left)")
            with self.lock:
                self.current = self._record(part, **base)
            start = time.monotonic()
            result, status, reason = None, "ok", None
            try:
                result = part.run(self.ctx)
                if isinstance(result, dict) and result.get("passed") is False:
                    status = "failed"
            except Skip as e:
                status, reason = "skipped", str(e)
            except Exception as e:  # recorded; the next part still runs
                status, reason = "error", f"{type(e).__name__}: {e}"[:2000]
                result = {"traceback": traceback.format_exc()[-6000:]}
            self._finish_part({**self._record(part, **base), "status": status,
                               **({"reason": reason} if reason else {}),
                               "seconds": time.monotonic() - start}, result)
        with self.lock:
            if self.done:  # the watchdog wrote the summary first and is exiting
                return 0
            self.done = True
            self.watchdog.cancel()
            self._write_summary(interrupted=None)
        self.cleanup()
        return 1 if any(r["status"] in ("failed", "error") for r in self.records) else 0

    def _on_budget(self) -> None:
        """At the hard deadline: record the running part, write the summary, exit."""
        with self.lock:
            if self.done:
                return
            self.done = True
            interrupted = None
            if self.current is not None:
                interrupted = {**self.current, "status": "interrupted",
                               "reason": "the budget ran out before the part ended",
                               "seconds": time.monotonic() - _START - self.current["started_s"]}
                self.records.append(interrupted)
                write_json(self.ctx.out / f"{interrupted['part']}.json",
                           {**interrupted, "result": None})
            self._write_summary(interrupted=interrupted)
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.ctx.log("budget reached: summary written, workers stopped")
        self.cleanup()
        os._exit(0)

    def _write_summary(self, interrupted: dict[str, Any] | None) -> None:
        done = {r["part"] for r in self.records}
        records = self.records + [
            {"part": p.key, "title": p.title, "status": "skipped",
             "reason": "not reached: the budget ran out"} for p in self.parts
            if p.key not in done]
        skipped = [{"part": r["part"], "reason": r.get("reason")} for r in records
                   if r["status"] == "skipped"]
        for key, result in self.results.items():
            skipped += [{"part": key, **item} for item in skipped_inside(result)]
        summary = {**self.header, "elapsed_s": time.monotonic() - _START,
                   "interrupted": interrupted["part"] if interrupted else None,
                   "parts": records, "skipped": skipped,
                   "imported": {m: m in sys.modules
                                for m in ("tensorflow", "tensorflow_datasets", "clu", "torch")},
                   "costs_at_end": {k: v for k, v in dataclasses.asdict(self.ctx.costs).items()
                                    if not callable(v)}}
        write_json(self.ctx.out / "summary.json", summary)
        from benchmarks import render

        text = render.render_check(*render.read_check(self.ctx.out))
        (self.ctx.out / "summary.md").write_text(text)
        self.ctx.log(f"wrote {self.ctx.out}/summary.json and summary.md "
                     f"({summary['elapsed_s']:.0f} s; skipped: "
                     + (", ".join(f"{s['part']}{'/' + s['item'] if 'item' in s else ''}"
                                  for s in skipped) or "nothing") + ")")


# --------------------------------------------------------------------------------------
# Command line


def use_wheels(directory: Path) -> list[str]:
    """Puts every pure-Python wheel (``*-none-any.whl``) of ``directory`` on the path.

    Python imports a pure-Python wheel straight from the zip file (zipimport), so the
    carried ml_collections needs neither pip nor a registry: prepended to ``sys.path``
    here and to ``PYTHONPATH`` for the worker processes. Returns the wheels used.
    """
    wheels = sorted(str(p.resolve()) for p in directory.glob("*-none-any.whl"))
    for w in reversed(wheels):
        if w not in sys.path:
            sys.path.insert(0, w)
    paths = [str(ROOT), *wheels, *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    os.environ["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
    return wheels


def select_parts(spec: str | None) -> list[Part]:
    """Parts named by a comma-separated list of keys or key prefixes, in priority order."""
    if not spec:
        return list(PARTS)
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tokens if not any(p.key == t or p.key.startswith(t) for p in PARTS)]
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; valid: {[p.key for p in PARTS]} "
                         "(or a prefix such as a, b, f)")
    return [p for p in PARTS if any(p.key == t or p.key.startswith(t) for t in tokens)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The check's flags."""
    # argparse (not absl.flags): one process, no config file; --help lists the parts.
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0],
        epilog="parts, in priority order: " + ", ".join(p.key for p in PARTS)
        + ". See the module docstring for the estimates and the GPU command.")
    parser.add_argument("--budget_s", type=float, default=540.0,
                        help="wall-clock seconds from the process start (default 540: one "
                             "10-minute command of a 15-minute GPU loan)")
    parser.add_argument("--out", default=None, help="results directory (required to run)")
    parser.add_argument("--tiny", action="store_true",
                        help="the CPU dry run: every part at tiny sizes, CPU priors")
    parser.add_argument("--parts", default=None,
                        help="comma-separated part keys or prefixes (default: all)")
    parser.add_argument("--wheels", default=str(ROOT / "wheels"),
                        help="directory of carried pure-Python wheels put on the path")
    parser.add_argument("--torch_device", default=None,
                        help="PyTorch's device (default: cuda when jax runs on a GPU)")
    parser.add_argument("--reserve_s", type=float, default=None,
                        help="seconds kept for writing the summary and exiting "
                             "(default 10, --tiny 3)")
    parser.add_argument("--plan", action="store_true",
                        help="print each part's estimate from the priors and exit")
    args = parser.parse_args(argv)
    if args.out is None and not args.plan:
        parser.error("--out DIR is required (or --plan)")
    try:
        args.parts = select_parts(args.parts)
    except ValueError as e:
        parser.error(str(e))
    if args.reserve_s is None:
        args.reserve_s = 3.0 if args.tiny else 10.0
    return args


def plan(tiny: bool, parts: Sequence[Part] = PARTS) -> list[tuple[str, float, str]]:
    """Each part's estimate from the priors, as if every part before it had run."""
    ctx = Context(TINY_SIZES if tiny else GPU_SIZES, tiny_costs() if tiny else gpu_costs(),
                  deadline=math.inf, out=Path("."), tiny=tiny)
    out = []
    for part in parts:
        est, formula = part.estimate(ctx)
        out.append((part.key, est, formula))
        s = ctx.sizes  # what the part leaves compiled, for the next estimates
        if part.key == "b_table6_core":
            ctx.compiled |= {(m, "f32", s.batch) for m in s.core_methods}
        elif part.key == "f1_table6_f32":
            ctx.compiled |= {(m, "f32", s.batch) for m in s.table6_methods}
        elif part.key == "f2_table6_bf16_core":
            ctx.compiled |= {(m, "bf16", s.batch) for m in s.core_methods}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check; returns the exit status."""
    args = parse_args(argv)
    if args.plan:
        total = 0.0
        for key, est, formula in plan(args.tiny, args.parts):
            total += est
            print(f"{key:22s} {est:6.0f} s  (cumulative {total:5.0f} s)  {formula}")
        return 0
    hard_deadline = _START + args.budget_s - 1.0
    deadline = _START + args.budget_s - args.reserve_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.json"), out / "summary.md"]:
        stale.unlink(missing_ok=True)  # an earlier run's parts would read as this run's
    wheels = use_wheels(Path(args.wheels))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    cache_dir = tempfile.mkdtemp(prefix="gpu_check_jax_cache_")
    os.environ["SVDCOND_JAX_CACHE_DIR"] = cache_dir  # the workers of part d share it
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    backend = jax.default_backend()
    ctx = Context(TINY_SIZES if args.tiny else GPU_SIZES,
                  tiny_costs() if args.tiny else gpu_costs(), deadline=deadline, out=out,
                  tiny=args.tiny, platform=backend,
                  torch_device=args.torch_device or ("cpu" if backend == "cpu" else "cuda"))
    header = {"command": "python -m benchmarks.gpu_check " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "budget_s": args.budget_s, "tiny": args.tiny, "sizes": dataclasses.asdict(ctx.sizes),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "platform": backend, "device_kind": jax.devices()[0].device_kind,
              "jax": jax.__version__, "wheels": [Path(w).name for w in wheels],
              "startup_s": time.monotonic() - _START}
    ctx.log(f"gpu_check: {backend} ({header['device_kind']}), budget {args.budget_s:.0f} s, "
            f"{ctx.left():.0f} s left after start-up; parts: "
            + ", ".join(p.key for p in args.parts))
    runner = Runner(ctx, args.parts, header, hard_deadline,
                    cleanup=lambda: shutil.rmtree(cache_dir, ignore_errors=True))
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
