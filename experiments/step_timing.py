"""One training step of every method, forward and backward separately (Table 6).

    python -m experiments.step_timing                      # CifarResNet50, batch 128, CIFAR100
    python -m experiments.step_timing --batch 16 --repeats 5 --rounds 3   # small CPU run
    python -m experiments.step_timing --methods all --out runs/step_timing.json

The steps are the training library's own (`svdcond_jax.training.state.create_setup`,
`create_train_state` and `steps.train_step`, jitted on one device): the forward is the
jitted training-mode forward pass plus the loss (batch statistics updated, as in
training); the step is the jitted full train step (forward + backward + NOG/OLR/SGD
update + the non-finite check); backward := step - forward. Times are medians over
`rounds x repeats` timed calls after a compile/warm-up call; the methods are timed in
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdcond_jax.training import state as state_lib
from svdcond_jax.training import steps
from svdcond_jax.training.config import get_config
from svdcond_jax.training.methods import METHODS

TABLE6_METHODS = ("bn", "svd", "svd+nog", "svd+olr", "svd+nog+olr", "svd+ow",
                  "svd+nog+ow+olr", "newton_schulz")
PAPER_MS = {  # Table 6, RTX A6000, ResNet-50 CIFAR100, batch 128: (FP, BP)
    "bn": (42, 90), "svd": (44, 95), "svd+nog": (44, 97), "svd+olr": (44, 96),
    "svd+nog+ow+olr": (49, 106), "newton_schulz": (43, 93),
}
# (name, numerator, denominator, target overhead %, paper overhead %)
TARGETS = (
    ("NOG+OLR over the SVD step", "svd+nog+olr", "svd", 1.0, 2.0),
    ("NOG+OW+OLR over the SVD step", "svd+nog+ow+olr", "svd", 5.0, 11.5),
    ("SVD layer over plain BN", "svd", "bn", 3.0, 5.3),
)


def build_steps(method: str, *, model: str, batch: int, image_size: int, num_classes: int,
                seed: int = 0) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Compiles one method's forward and train step on a fixed random batch.

    Args:
      method: a name from `svdcond_jax.training.methods.METHODS`.
      model: model class name in `svdcond_jax.models`.
      batch: batch size.
      image_size: square image side (3 channels).
      num_classes: classifier size.
      seed: PRNG seed of the parameters and the batch.

    Returns:
      `(forward, step)`: zero-argument callables that run one call and block until the
      result is ready; `step` carries its train state from call to call.
    """
    config = get_config()
    config.update({"method": method, "model": model, "task": "dbn", "dataset": "cifar100"})
    setup = state_lib.create_setup(config, num_classes=num_classes, steps_per_epoch=100)
    shape = (image_size, image_size, 3)
    st = state_lib.create_train_state(jax.random.key(seed), setup, shape)
    rng = np.random.default_rng(seed)
    data = {"image": jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, num_classes, size=(batch,)), jnp.int32)}

    @jax.jit
    def forward(params, batch_stats, images, labels):
        logits, updates = setup.model.apply({"params": params, "batch_stats": batch_stats},
                                            images, train=True, mutable=["batch_stats"])
        return jnp.mean(steps.cross_entropy_loss(logits, labels)), updates

    train = jax.jit(functools.partial(
        steps.train_step, learning_rate_fn=setup.learning_rate_fn, ol_coeff=setup.ol_coeff,
        ol_pattern=setup.pre_svd_pattern), donate_argnums=0)
    holder = {"state": st}

    def run_forward() -> Any:
        s = holder["state"]
        return jax.block_until_ready(forward(s.params, s.batch_stats, data["image"],
                                             data["label"]))

    def run_step() -> Any:
        holder["state"], metrics = train(holder["state"], data)
        return jax.block_until_ready(metrics)

    return run_forward, run_step


def _time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(methods: Sequence[str], *, model: str, batch: int, image_size: int,
            num_classes: int, repeats: int, rounds: int, log: Callable[[str], None] = print
            ) -> dict[str, dict[str, float]]:
    """Times forward and full step per method (milliseconds, medians).

    Returns:
      method -> {"fp_ms", "step_ms", "bp_ms" (= step - fp), "compile_s"}.
    """
    built = {}
    for m in methods:
        start = time.perf_counter()
        built[m] = build_steps(m, model=model, batch=batch, image_size=image_size,
                               num_classes=num_classes)
        for fn in built[m]:
            fn()  # compile + warm up
            fn()
        log(f"[{m}] compiled in {time.perf_counter() - start:.1f} s")
    fp: dict[str, list[float]] = {m: [] for m in methods}
    step: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            fp[m] += _time_calls(built[m][0], repeats)
            step[m] += _time_calls(built[m][1], repeats)
    results = {}
    for m in methods:
        f, s = 1e3 * statistics.median(fp[m]), 1e3 * statistics.median(step[m])
        results[m] = {"fp_ms": f, "step_ms": s, "bp_ms": s - f}
    return results


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="CifarResNet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--methods", type=_methods, default=list(TABLE6_METHODS),
                        help="comma-separated, or 'all' (default: Table 6's rows)")
    parser.add_argument("--out", default="runs/step_timing.json")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    header = (f"One training step, {args.model}, batch {args.batch}, {args.image_size}px, "
              f"{args.num_classes} classes, on {device.platform} ({device.device_kind})")
    results = measure(args.methods, model=args.model, batch=args.batch,
                      image_size=args.image_size, num_classes=args.num_classes,
                      repeats=args.repeats, rounds=args.rounds)
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
