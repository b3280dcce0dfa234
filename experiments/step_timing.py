"""One training step of every method, forward and backward separately (Table 6).

    python -m experiments.step_timing                      # CifarResNet50, batch 128, CIFAR100
    python -m experiments.step_timing --batch 16 --repeats 5 --rounds 3   # small CPU run
    python -m experiments.step_timing --methods all --out runs/step_timing.json
    python -m experiments.step_timing --precision bf16     # bfloat16 convs and matmuls

The steps are the training library's own (`svdcond_jax.training.state.create_setup`,
`create_train_state` and `steps.train_step`, jitted on one device): the forward is the
jitted training-mode forward pass plus the loss (batch statistics updated, as in
training); the step is the jitted full train step (forward + backward + NOG/OLR/SGD
update + the non-finite check), both compiled ahead of time (`jax.jit(...).lower(...)
.compile()`, which also gives XLA's FLOPs and memory per step); backward := step -
forward. Times are medians over `rounds x repeats` timed calls after two warm-up calls;
the methods are timed in
interleaved rounds so that drift of the machine hits them alike. Every time is also
reported as a ratio to the vanilla ResNet (`bn`), like Table 6 (RTX A6000: vanilla 42 ms
FP / 90 ms BP at batch 128).

Targets printed next to the measurements (not asserted): NOG+OLR add <= 1% to an SVD step
(paper +2%), all treatments together (NOG+OW+OLR) <= 5% over the SVD step (paper +11.5%),
the SVD layer <= 3% over plain BN (paper +5%).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from svdcond_jax.training import runtime, steps
from svdcond_jax.training import state as state_lib
from svdcond_jax.training.config import get_config
from svdcond_jax.training.methods import METHODS

TABLE6_METHODS = ("bn", "svd", "svd+nog", "svd+olr", "svd+nog+olr", "svd+ow",
                  "svd+nog+ow+olr", "newton_schulz")
PAPER_MS = {  # Table 6, RTX A6000, ResNet-50 CIFAR100, batch 128: (FP, BP)
    "bn": (42, 90), "svd": (44, 95), "svd+nog": (44, 97), "svd+olr": (44, 96),
    "svd+nog+ow+olr": (49, 106), "newton_schulz": (43, 93),
}
PRECISIONS = ("f32", "bf16")
# (name, numerator, denominator, target overhead %, paper overhead %)
TARGETS = (
    ("NOG+OLR over the SVD step", "svd+nog+olr", "svd", 1.0, 2.0),
    ("NOG+OW+OLR over the SVD step", "svd+nog+ow+olr", "svd", 5.0, 11.5),
    ("SVD layer over plain BN", "svd", "bn", 3.0, 5.3),
)


class Built(NamedTuple):
    """One method's compiled forward and train step, with XLA's static costs.

    `forward` / `step` are zero-argument callables that run one call and block until the
    result is ready (`step` carries its train state from call to call). `compile_s` is
    the wall time of lowering + compiling both (the persistent cache, when on, shortens
    it); `step_flops` / `forward_flops` are XLA's cost-analysis FLOPs per call (None
    where the backend reports none); `step_memory_bytes` is the compiled step's
    arguments + outputs + temporaries minus donated aliases (XLA's memory analysis: the
    device memory one step needs); `params` the number of trainable parameters;
    `step_hlo()` the step's optimised HLO text (for profiles).
    """

    forward: Callable[[], Any] | None
    step: Callable[[], Any]
    compile_s: float
    step_flops: float | None
    forward_flops: float | None
    step_memory_bytes: int | None
    params: int
    step_hlo: Callable[[], str]


def _flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    value = (cost or {}).get("flops")
    return float(value) if value and value > 0 else None


def _memory_bytes(compiled: Any) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def build_steps(method: str, *, model: str, batch: int, image_size: int, num_classes: int,
                precision: str = "f32", seed: int = 0, with_forward: bool = True) -> Built:
    """Compiles one method's forward and train step on a fixed random batch.

    Args:
      method: a name from `svdcond_jax.training.methods.METHODS`.
      model: model class name in `svdcond_jax.models`.
      batch: batch size.
      image_size: square image side (3 channels).
      num_classes: classifier size.
      precision: "f32", or "bf16" for bfloat16 convolutions, matmuls and norms
        (`config.half_precision`; parameters, BN/DBN statistics and the meta-layer stay
        float32).
      seed: PRNG seed of the parameters and the batch.
      with_forward: also compile the forward (False: `forward` is None, for benchmarks of
        the step alone).

    Returns:
      The compiled :class:`Built` callables and costs.

    Raises:
      ValueError: for an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {PRECISIONS}")
    config = get_config()
    config.update({"method": method, "model": model, "task": "dbn", "dataset": "cifar100",
                   "half_precision": precision == "bf16"})
    setup = state_lib.create_setup(config, num_classes=num_classes, steps_per_epoch=100)
    shape = (image_size, image_size, 3)
    st = state_lib.create_train_state(jax.random.key(seed, impl=config.prng_impl), setup,
                                      shape)
    rng = np.random.default_rng(seed)
    data = {"image": jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, num_classes, size=(batch,)), jnp.int32)}

    def forward(params, batch_stats, images, labels):
        logits, updates = setup.model.apply({"params": params, "batch_stats": batch_stats},
                                            images, train=True, mutable=["batch_stats"])
        return jnp.mean(steps.cross_entropy_loss(logits, labels)), updates

    train = functools.partial(
        steps.train_step, learning_rate_fn=setup.learning_rate_fn, ol_coeff=setup.ol_coeff,
        ol_pattern=setup.pre_svd_pattern)
    start = time.perf_counter()
    fwd_c = None
    if with_forward:
        fwd_c = jax.jit(forward).lower(st.params, st.batch_stats, data["image"],
                                       data["label"]).compile()
    train_c = jax.jit(train, donate_argnums=0).lower(st, data).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": st}

    def run_forward() -> Any:
        s = holder["state"]
        return jax.block_until_ready(fwd_c(s.params, s.batch_stats, data["image"],
                                           data["label"]))

    def run_step() -> Any:
        holder["state"], metrics = train_c(holder["state"], data)
        return jax.block_until_ready(metrics)

    return Built(run_forward if with_forward else None, run_step, compile_s, _flops(train_c),
                 None if fwd_c is None else _flops(fwd_c), _memory_bytes(train_c),
                 sum(int(x.size) for x in jax.tree_util.tree_leaves(st.params)),
                 train_c.as_text)


def _time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(methods: Sequence[str], *, model: str, batch: int, image_size: int,
            num_classes: int, repeats: int, rounds: int, precision: str = "f32",
            log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Times forward and full step per method (milliseconds, medians of interleaved rounds).

    Returns:
      method -> {"fp_ms", "step_ms", "bp_ms" (= step - fp), "fp_min_ms", "step_min_ms",
      "compile_s", "step_gflops" (XLA cost analysis, or None), "step_tflops_per_s"
      (achieved: step FLOPs / median step time), "step_memory_mb" (XLA memory analysis),
      "peak_memory_mb" (the device's peak bytes in use so far, where it reports them;
      None on CPU)}.
    """
    built = {}
    for m in methods:
        built[m] = build_steps(m, model=model, batch=batch, image_size=image_size,
                               num_classes=num_classes, precision=precision)
        for fn in built[m][:2]:
            fn()  # warm up
            fn()
        log(f"[{m}] compiled in {built[m].compile_s:.1f} s")
    fp: dict[str, list[float]] = {m: [] for m in methods}
    step: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            fp[m] += _time_calls(built[m].forward, repeats)
            step[m] += _time_calls(built[m].step, repeats)
    results = {}
    for m in methods:
        f, s = 1e3 * statistics.median(fp[m]), 1e3 * statistics.median(step[m])
        flops = built[m].step_flops
        mem = built[m].step_memory_bytes
        results[m] = {"fp_ms": f, "step_ms": s, "bp_ms": s - f,
                      "fp_min_ms": 1e3 * min(fp[m]), "step_min_ms": 1e3 * min(step[m]),
                      "compile_s": built[m].compile_s,
                      "step_gflops": None if flops is None else flops / 1e9,
                      "step_tflops_per_s": None if flops is None else flops / s / 1e9,
                      "step_memory_mb": None if mem is None else mem / 2**20,
                      "peak_memory_mb": _device_peak_mb()}
    return results


def _device_peak_mb() -> float | None:
    """Peak bytes in use on device 0 (GPU/TPU; None where not reported, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _ratio(results: dict[str, dict[str, float]], m: str, key: str, base: str) -> str:
    if base not in results:
        return "–"
    return f"{results[m][key] / results[base][key]:.3f}"


def format_table(results: dict[str, dict[str, float]], *, header: str) -> str:
    """Markdown table: FP/BP/step in ms, ratios to `bn`, and the paper's Table 6 numbers."""
    lines = [f"### {header}", "",
             "| Method | FP (ms) | BP (ms) | Step (ms) | FP / bn | BP / bn | Step / bn "
             "| Paper FP / BP (ms) |", "|" + "---|" * 8]
    for m, r in results.items():
        paper = PAPER_MS.get(m)
        lines.append(
            f"| {m} | {r['fp_ms']:.1f} | {r['bp_ms']:.1f} | {r['step_ms']:.1f} "
            f"| {_ratio(results, m, 'fp_ms', 'bn')} | {_ratio(results, m, 'bp_ms', 'bn')} "
            f"| {_ratio(results, m, 'step_ms', 'bn')} "
            f"| {f'{paper[0]} / {paper[1]}' if paper else '–'} |")
    return "\n".join(lines) + "\n"


def overheads(results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The three Table 6 targets: measured step overhead (%) against target and paper."""
    out = []
    for name, num, den, target, paper in TARGETS:
        if num in results and den in results:
            pct = 100.0 * (results[num]["step_ms"] / results[den]["step_ms"] - 1.0)
            out.append({"name": name, "overhead_pct": pct, "target_pct": target,
                        "paper_pct": paper, "meets_target": pct <= target})
    return out


def format_overheads(rows: Sequence[dict[str, Any]]) -> str:
    """One line per target, e.g. 'NOG+OLR over the SVD step: +0.4% (target <= 1%, ...)'."""
    return "\n".join(
        f"{r['name']}: {r['overhead_pct']:+.1f}% (target <= {r['target_pct']:g}%, "
        f"paper +{r['paper_pct']:g}%) {'meets' if r['meets_target'] else 'MISSES'} target"
        for r in rows) + "\n"


def _methods(text: str) -> list[str]:
    if text == "all":
        return list(METHODS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; valid: {METHODS}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses flags, measures, prints the table and targets, writes JSON; returns it."""
    # Kept on argparse (not absl.flags): a single-process timing tool with no config file,
    # so config_flags has nothing to do here; its Namespace feeds the timing functions
    # and tests directly. Converting would change no behaviour.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="CifarResNet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--methods", type=_methods, default=list(TABLE6_METHODS),
                        help="comma-separated, or 'all' (default: Table 6's rows)")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32",
                        help="bf16: bfloat16 convs/matmuls/norms (the meta-layer stays f32)")
    parser.add_argument("--out", default="runs/step_timing.json")
    args = parser.parse_args(argv)
    runtime.configure()
    device = jax.devices()[0]
    header = (f"One training step, {args.model}, batch {args.batch}, {args.image_size}px, "
              f"{args.num_classes} classes, {args.precision}, on {device.platform} "
              f"({device.device_kind})")
    results = measure(args.methods, model=args.model, batch=args.batch,
                      image_size=args.image_size, num_classes=args.num_classes,
                      repeats=args.repeats, rounds=args.rounds, precision=args.precision)
    targets = overheads(results)
    print(format_table(results, header=header))
    print(format_overheads(targets))
    report = {"header": header, "args": vars(args), "device": str(device),
              "host": platform.node(), "jax": jax.__version__, "results": results,
              "targets": targets}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
