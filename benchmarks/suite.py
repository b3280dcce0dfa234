"""The whole performance suite in one command; writes ``<out>/<name>.json`` and ``.md``.

The GPU run (one NVIDIA GPU; install ``pip install -e ".[experiments,cuda,benchmarks]"``
with a CUDA build of PyTorch), exactly::

    python -m benchmarks.suite --out benchmarks/results

The CPU run committed as ``benchmarks/results/cpu-CifarResNet50.{json,md}`` (small batch)::

    python -m benchmarks.suite --out benchmarks/results --batch 8 --mfu_batch 16 \\
        --meta_shapes 1x64x64,16x256x256 --rounds 2 --repeats 2 --torch_rounds 2

Parts (``--parts``, default all):

* ``table6``: the paper's Table 6 with ``experiments/step_timing.py``: forward, backward
  (step - forward) and step of every Table 6 method row for each of ``--precisions``
  (``f32``; ``bf16`` = bfloat16 convolutions, matmuls and norms, the meta-layer and
  statistics stay float32), with the three overhead targets, XLA's FLOPs and memory per
  step and the compile time.
* ``torch``: ``benchmarks/step_vs_torch.py``: our jitted step against PyTorch eager and
  ``torch.compile`` (same network, batch and precision; one process per column,
  interleaved rounds; on a GPU torch runs on ``cuda``). Goal on a GPU: our step >= 1.5x
  the throughput of the faster PyTorch variant.
* ``mfu``: the plain-BN step at ``--mfu_batch``: model FLOPs per step from XLA's cost
  analysis (``jax.jit(...).lower(...).compile().cost_analysis()``), achieved TFLOP/s and,
  for a device in :data:`PEAK_BF16_TFLOPS`, the fraction of its dense bf16 peak (goal
  >= 40% on the GPU). On CPU only the achieved FLOP/s.
* ``meta_layer``: ``benchmarks/meta_layer.py``: forward and forward+backward of every
  meta-layer method on ``--meta_shapes`` against ``torch.linalg.eigh`` with autograd.
* ``memory``: per method, the device memory one step needs (XLA's memory analysis of the
  compiled step) and the device's peak bytes in use where it reports them
  (``device.memory_stats()``; GPU), against the plain-BN step; the process peak RSS.

Compile times are cold: jax's persistent compilation cache is off unless ``--cache``.

``python -m benchmarks.render benchmarks/results/*.json`` turns results files into the
README's performance section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PARTS = ("table6", "torch", "mfu", "meta_layer", "memory")
TORCH_METHODS = ("bn", "svd", "svd+nog+olr")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets, by
# lower-case substring of jax's device_kind.
PEAK_BF16_TFLOPS = {
    "h200": 989.4,
    "h100 pcie": 756.0,
    "h100": 989.4,  # SXM5 / HBM3
    "a100": 312.0,
    "l4": 121.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of a known device (first matching key of PEAK_BF16_TFLOPS)."""
    kind = device_kind.lower()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def device_name(model: str) -> str:
    """Results file stem: ``cpu-<model>`` on CPU, ``<device kind slug>-<model>`` else."""
    import jax

    dev = jax.devices()[0]
    kind = "cpu" if dev.platform == "cpu" else re.sub(r"[^a-z0-9]+", "-",
                                                      dev.device_kind.lower()).strip("-")
    return f"{kind}-{model}"


def versions() -> dict[str, str]:
    """Versions of the frameworks involved (torch only when installed)."""
    import flax
    import jax
    import jaxlib
    import optax

    out = {"python": platform.python_version(), "jax": jax.__version__,
           "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__}
    try:
        import torch
    except ImportError:
        return out
    out["torch"] = torch.__version__
    return out


def machine() -> dict[str, Any]:
    """Device, host CPU, cores, load average, date."""
    import jax

    from benchmarks.step_vs_torch import _cpu_name

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "host_cpu": _cpu_name(),
            "cores": os.cpu_count(), "load_avg": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run_table6(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Table 6 rows per precision, with the overhead targets."""
    from experiments import step_timing

    out = {}
    for precision in args.precisions:
        log(f"table6 {precision}: {', '.join(args.methods)}")
        results = step_timing.measure(args.methods, model=args.model, batch=args.batch,
                                      image_size=args.image_size,
                                      num_classes=args.num_classes, repeats=args.repeats,
                                      rounds=args.rounds, precision=precision, log=log)
        out[precision] = {"results": results, "targets": step_timing.overheads(results)}
    return out


def run_torch(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Our step against PyTorch eager / compile, per precision."""
    from benchmarks import step_vs_torch

    out = {}
    for precision in args.precisions:
        sub = step_vs_torch.parse_args([
            "--methods", ",".join(m for m in TORCH_METHODS if m in args.methods or m == "bn"),
            "--columns", "ours,torch,torch-compile", "--model", args.model,
            "--batch", str(args.batch), "--image_size", str(args.image_size),
            "--num_classes", str(args.num_classes), "--precision", precision,
            "--device", args.torch_device, "--rounds", str(args.torch_rounds),
            "--steps", str(args.repeats)])
        report = step_vs_torch.run(sub, log)
        for row in report["rows"]:
            c = row["columns"]
            faster = min((c[k]["step_s"] for k in ("torch", "torch-compile") if k in c),
                         default=None)
            row["speedup_vs_faster_torch"] = (None if faster is None or "ours" not in c
                                              else faster / c["ours"]["step_s"])
        out[precision] = report
    return out


def run_mfu(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """FLOPs, achieved TFLOP/s and MFU of the plain-BN step at ``--mfu_batch``."""
    import jax

    from experiments import step_timing

    out = {}
    kind = jax.devices()[0].device_kind
    peak = None if jax.devices()[0].platform == "cpu" else peak_tflops(kind)
    for precision in args.precisions:
        log(f"mfu {precision}: bn at batch {args.mfu_batch}")
        res = step_timing.measure(["bn"], model=args.model, batch=args.mfu_batch,
                                  image_size=args.image_size, num_classes=args.num_classes,
                                  repeats=args.repeats, rounds=args.rounds,
                                  precision=precision, log=log)["bn"]
        achieved = res["step_tflops_per_s"]
        out[precision] = {"batch": args.mfu_batch, "step_ms": res["step_ms"],
                          "step_gflops": res["step_gflops"], "achieved_tflops": achieved,
                          "peak_bf16_tflops": peak,
                          "mfu": None if peak is None or achieved is None else achieved / peak}
    return out


def run_meta_layer(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    """Meta-layer rows (every method + torch.linalg.eigh) on ``--meta_shapes``."""
    from benchmarks import meta_layer

    log(f"meta_layer: {args.meta_shapes}")
    shapes = [meta_layer.parse_shape(s) for s in args.meta_shapes.split(",") if s]
    return meta_layer.run(shapes, args.repeats * args.rounds, torch=_has_torch(),
                          torch_device=args.torch_device)


def memory_rows(table6: dict[str, Any]) -> dict[str, Any]:
    """Per precision and method: step memory (XLA) and device peak, against ``bn``."""
    out = {}
    for precision, part in table6.items():
        res = part["results"]
        base = res.get("bn", {}).get("step_memory_mb")
        out[precision] = {m: {"step_memory_mb": r["step_memory_mb"],
                              "vs_bn": None if not base or r["step_memory_mb"] is None
                              else r["step_memory_mb"] / base,
                              "device_peak_mb": r["peak_memory_mb"]} for m, r in res.items()}
    return out


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The suite's flags (defaults: the GPU run)."""
    from experiments.step_timing import TABLE6_METHODS

    # Kept on argparse (not absl.flags): composes step_vs_torch's argparse Namespaces; no
    # config file, one process.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="results directory")
    parser.add_argument("--name", default=None,
                        help="results file stem (default: <device>-<model>, cpu-<model>)")
    parser.add_argument("--parts", type=_list, default=list(PARTS))
    parser.add_argument("--model", default="CifarResNet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mfu_batch", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--methods", type=_list, default=list(TABLE6_METHODS))
    parser.add_argument("--precisions", type=_list, default=["f32", "bf16"])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--torch_rounds", type=int, default=5)
    parser.add_argument("--torch_device", default=None, help="default: cuda on a GPU")
    parser.add_argument("--meta_shapes", default="1x64x64,256x256x256")
    parser.add_argument("--cache", action="store_true",
                        help="use jax's persistent compilation cache (default off: the "
                             "reported compile times are cold)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; valid: {PARTS}")
    return args


def _list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the selected parts, writes ``<out>/<name>.json`` and ``.md``; returns the report."""
    from svdcond_jax.training import runtime

    args = parse_args(argv)
    settings = runtime.configure(**({} if args.cache else {"cache_dir": None}))
    import jax

    from benchmarks import render

    if args.torch_device is None:
        args.torch_device = "cpu" if jax.devices()[0].platform == "cpu" else "cuda"

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    report: dict[str, Any] = {"machine": machine(), "versions": versions(),
                              "command": "python -m benchmarks.suite " + " ".join(
                                  sys.argv[1:] if argv is None else argv),
                              "args": vars(args), "runtime": settings}
    if "table6" in args.parts or "memory" in args.parts:
        report["table6"] = run_table6(args, log)
    if "memory" in args.parts:
        report["memory"] = memory_rows(report["table6"])
    if "mfu" in args.parts:
        report["mfu"] = run_mfu(args, log)
    if "meta_layer" in args.parts:
        report["meta_layer"] = run_meta_layer(args, log)
    if "torch" in args.parts:
        if _has_torch():
            report["torch"] = run_torch(args, log)
        else:
            log("torch: skipped (PyTorch is not installed; pip install -e '.[benchmarks]')")
    report["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["machine"]["load_avg_end"] = os.getloadavg()
    name = args.name or device_name(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(render.render([report]))
    print(f"wrote {out / name}.json and .md")
    return report


if __name__ == "__main__":
    main()
