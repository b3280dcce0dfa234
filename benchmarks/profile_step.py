"""Where a train step's time goes: XLA's per-op (thunk) times from a ``jax.profiler`` trace.

    python -m benchmarks.profile_step --method svd --batch 32           # our step
    python -m benchmarks.profile_step --column flax --batch 32          # plain-Flax baseline

Builds the step (``ours``: ``experiments/step_timing.py``; ``flax``:
``benchmarks/flax_resnet.py``), runs two warm-up steps, traces ``--steps`` steps with
``jax.profiler`` and sums the duration of every XLA:CPU thunk (one fused kernel, library
call or copy) over the trace. Printed per step: the total thunk time (summed over XLA's
threads, so it can exceed the wall time), the kinds of op (the thunk name without its
numeric suffix: ``ynn_fusion`` = convolutions and matmuls in XNNPACK's successor YNNPACK,
``transpose_copy_fusion``, elementwise ``*_fusion``s, ...) with their share, and the top
ops with the source line XLA recorded for them. Thread time is robust to other processes
only up to preemption: compare shares, not absolute times, on a loaded machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from typing import Any

# Trace events that are not XLA ops (executor bookkeeping, Python, PjRt).
NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "CommonPjRt",
           "ParseArguments", "end: ", "TfrtCpu", "PjRt")


def op_times(trace_dir: str) -> dict[str, float]:
    """Total duration (microseconds) of each XLA op name in a ``jax.profiler`` trace."""
    files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                          "*.trace.json.gz")))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    events = json.loads(gzip.open(files[-1]).read())["traceEvents"]
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS):
            out[e["name"]] += float(e.get("dur", 0.0))
    return dict(out)


def op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the ``op_name`` metadata XLA kept for it (the jax source op)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text,
                         re.MULTILINE):
        out.setdefault(m.group(1), m.group(2))
    return out


def summarize(times: dict[str, float], steps: int, sources: dict[str, str] | None = None,
              top: int = 15) -> dict[str, Any]:
    """Per-step totals by kind of op and the ``top`` single ops."""
    kinds: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for name, us in times.items():
        kind = re.sub(r"[.\d]+$", "", name)
        kinds[kind] += us
        counts[kind] += 1
    total = sum(kinds.values())
    ms = 1e-3 / steps
    return {
        "total_ms": total * ms,
        "kinds": [{"kind": k, "ms": v * ms, "share": v / total, "ops": counts[k]}
                  for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])],
        "top": [{"op": k, "ms": v * ms, "source": (sources or {}).get(k, "")}
                for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:top]],
    }


def format_summary(s: dict[str, Any], kinds: int = 12) -> str:
    """Plain-text tables of :func:`summarize`'s output."""
    lines = [f"thunk time per step: {s['total_ms']:.0f} ms (summed over XLA's threads)", "",
             f"{'ms/step':>9} {'share':>6} {'ops':>5}  kind"]
    lines += [f"{k['ms']:9.1f} {100 * k['share']:5.1f}% {k['ops']:5d}  {k['kind']}"
              for k in s["kinds"][:kinds]]
    lines += ["", f"{'ms/step':>9}  op  (source)"]
    lines += [f"{t['ms']:9.1f}  {t['op']}  ({t['source'][-90:]})" for t in s["top"]]
    return "\n".join(lines)


def _build(args: argparse.Namespace) -> tuple[Any, str]:
    """(run one step, optimised HLO text) of the column."""
    import jax

    if args.column == "flax":
        from benchmarks import flax_resnet

        step, state, batch = flax_resnet.build(flax_resnet.ResNet(num_classes=args.num_classes),
                                               batch=args.batch, image_size=args.image_size,
                                               num_classes=args.num_classes)
        compiled = step.lower(state, batch).compile()
        holder = {"state": state}

        def run() -> Any:
            holder["state"], loss = compiled(holder["state"], batch)
            return jax.block_until_ready(loss)

        return run, compiled.as_text()
    from experiments import step_timing

    built = step_timing.build_steps(args.method, model=args.model, batch=args.batch,
                                    image_size=args.image_size, num_classes=args.num_classes,
                                    with_forward=False)
    return built.step, built.step_hlo()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Builds, traces, prints the summary; returns it (also as JSON with ``--json``)."""
    # Kept on argparse (not absl.flags): a one-process profiler run, no config file.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--column", choices=("ours", "flax"), default="ours")
    parser.add_argument("--method", default="svd")
    parser.add_argument("--model", default="CifarResNet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2, help="traced steps")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from svdcond_jax.training import runtime

    runtime.configure()
    import jax

    run, hlo = _build(args)
    run()
    run()
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(args.steps):
                run()
        wall = (time.perf_counter() - start) / args.steps
        summary = summarize(op_times(tmp), args.steps, op_sources(hlo), args.top)
    summary.update({"wall_ms": 1e3 * wall, "load_avg": os.getloadavg(), "args": vars(args)})
    print(f"{args.column} {args.method}, {args.model}, batch {args.batch}: wall "
          f"{1e3 * wall:.0f} ms/step while traced, load {os.getloadavg()[0]:.1f}")
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
