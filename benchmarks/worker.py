"""One benchmark column in its own process: build a train step, then time it on request.

    python -m benchmarks.worker --column ours --method svd --batch 32

A column is a framework and mode: ``ours`` (``svdcond_jax``'s jitted train step, as in
``experiments/step_timing.py``), ``flax`` (the plain-Flax baseline of
``benchmarks/flax_resnet.py``; ``bn`` only), ``torch`` (PyTorch eager) or
``torch-compile`` (``torch.compile``) of ``benchmarks/torch_resnet.py``. Each column runs
in its own process so that its peak memory is its own and the frameworks' thread pools
never run at the same time; ``benchmarks/step_vs_torch.py`` drives several workers in
interleaved rounds.

Protocol (one JSON object per line on the original stdout; everything the frameworks
print goes to stderr): after building and running the first step the worker writes
``{"ready": true, "build_s", "first_step_s", "rss_peak_mb", "params", "device", ...}``;
then for each ``run N`` line on stdin it runs N steps and writes
``{"wall_s": [...], "cpu_s": [...], "skipped": ...}`` (wall and process CPU time per
step; how many steps so far were skipped as non-finite, for ours and PyTorch); ``quit`` writes
``{"rss_peak_mb": ..., "skipped": ...}`` and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

COLUMNS = ("ours", "flax", "torch", "torch-compile")


def rss_peak_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _build_ours(args: argparse.Namespace) -> tuple[Callable[[], Any], dict[str, Any]]:
    import jax

    from experiments import step_timing

    built = step_timing.build_steps(args.method, model=args.model, batch=args.batch,
                                    image_size=args.image_size, num_classes=args.num_classes,
                                    precision=args.precision, with_forward=False)
    info = {"params": built.params, "compile_s": built.compile_s,
            "step_gflops": built.step_flops and
            built.step_flops / 1e9, "device": str(jax.devices()[0].device_kind),
            "versions": {"jax": jax.__version__}}

    def step() -> Any:
        metrics = built.step()
        step.skipped = int(metrics["svd_failures"])  # the train step's own skip counter
        return metrics

    step.skipped = 0
    return step, info


def _build_flax(args: argparse.Namespace) -> tuple[Callable[[], Any], dict[str, Any]]:
    import flax
    import jax
    import jax.numpy as jnp

    from benchmarks import flax_resnet

    if args.method != "bn":
        raise ValueError(f"the plain-Flax baseline is the bn step only; got {args.method!r}")
    if args.model != "CifarResNet50":
        raise ValueError(f"the plain-Flax baseline is CifarResNet50 only; got {args.model!r}")
    model = flax_resnet.ResNet(num_classes=args.num_classes,
                               dtype=jnp.bfloat16 if args.precision == "bf16" else jnp.float32)
    step, state, batch = flax_resnet.build(model, batch=args.batch, image_size=args.image_size,
                                           num_classes=args.num_classes)
    holder = {"state": state}

    def run() -> Any:
        holder["state"], loss = step(holder["state"], batch)
        return jax.block_until_ready(loss)

    params = sum(x.size for x in jax.tree.leaves(state.params))
    return run, {"params": int(params), "device": str(jax.devices()[0].device_kind),
                 "versions": {"jax": jax.__version__, "flax": flax.__version__}}


def _build_torch(args: argparse.Namespace) -> tuple[Callable[[], Any], dict[str, Any]]:
    import torch

    from benchmarks import torch_resnet

    model = torch_resnet.model_for(args.method, args.model, args.num_classes)
    step = torch_resnet.build_step(args.method, model=model, batch=args.batch,
                                   image_size=args.image_size, num_classes=args.num_classes,
                                   compile=args.column == "torch-compile",
                                   compile_backend=args.compile_backend,
                                   precision=args.precision, device=args.device)
    device = args.device if args.device != "cpu" else "cpu"
    return step, {"params": torch_resnet.parameter_count(model), "device": device,
                  "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__}}


BUILDERS = {"ours": _build_ours, "flax": _build_flax, "torch": _build_torch,
            "torch-compile": _build_torch}


def _time(step: Callable[[], Any], n: int) -> dict[str, list[float]]:
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"wall_s": wall, "cpu_s": cpu}


def serve(args: argparse.Namespace, inp: TextIO, out: TextIO) -> None:
    """Builds the column, reports, then answers ``run N`` / ``quit`` lines from ``inp``."""
    start = time.perf_counter()
    step, info = BUILDERS[args.column](args)
    build_s = time.perf_counter() - start
    step()
    first = time.perf_counter() - start
    step()  # a second warm-up call (torch.compile may recompile; caches settle)

    def send(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    send({"ready": True, "column": args.column, "method": args.method, "build_s": build_s,
          "first_step_s": first, "rss_peak_mb": rss_peak_mb(), **info})
    for line in inp:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            send({**_time(step, int(cmd[1])), "skipped": getattr(step, "skipped", None)})
        elif cmd[0] == "quit":
            break
        else:
            send({"error": f"unknown command {line.strip()!r}"})
    send({"rss_peak_mb": rss_peak_mb(), "skipped": getattr(step, "skipped", None)})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The worker's flags."""
    # Kept on argparse (not absl.flags): a subprocess speaking a line protocol, started by
    # step_vs_torch with these options (also under PyTorch, which needs no absl).
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--column", choices=COLUMNS, required=True)
    parser.add_argument("--method", default="bn")
    parser.add_argument("--model", default="CifarResNet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of the torch-compile column")
    parser.add_argument("--cache", action="store_true",
                        help="use jax's persistent compilation cache (default: cold compile)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs one worker on stdin / the original stdout."""
    args = parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # framework chatter -> stderr
    sys.stdout = sys.stderr
    if args.column in ("ours", "flax"):
        from svdcond_jax.training import runtime

        runtime.configure(cache_dir=runtime.default_cache_dir() if args.cache else None)
    serve(args, sys.stdin, out)


if __name__ == "__main__":
    main()
