"""Benchmark the meta-layer methods: forward and forward+backward wall time.

Times ``jax.jit``-compiled forward (P -> P^{1/2}) and forward+backward (gradient of a
linear loss of P^{1/2} w.r.t. P) for every method, after one warm-up call, with
``block_until_ready``, reporting the median (and the min, robust to other processes on a
shared CPU) over ``--repeats`` interleaved rounds. Shapes default to the
paper's: (1, 64, 64) (decorrelated BN, one group of 64 channels) and (256, 256, 256)
(GCP: a batch of 256 covariances of 256 channels). Inputs are well-conditioned random SPD
matrices (eigenvalues in [1e-2, 1]) so that plain autodiff through eigh is finite.

With ``--torch`` (the ``benchmarks`` extra) the same forward and forward+backward of
``torch.linalg.eigh`` with plain autograd (eigenvalues clamped alike) is timed in the same
interleaved rounds, on ``--torch_device``.

Targets to report (not asserted): the exact eigh backward costs no more than plain autodiff
through eigh, and eigh fwd+bwd <= 1.5x fwd.

Threads: ``main`` first applies ``svdcond_jax.training.runtime.configure()``, which caps
SciPy's OpenBLAS (the LAPACK behind jax's CPU eigh) at one thread; its threads otherwise
fight XLA's own thread pool for the cores (docs/performance.md). Set
``OPENBLAS_NUM_THREADS`` yourself to override.

Usage:
  python -m benchmarks.meta_layer --quick --json meta_layer.json
  python -m benchmarks.meta_layer --shapes 1x64x64,256x256x256 --repeats 10 --torch
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from svdcond_jax import sqrtm

BASELINE = "eigh_autodiff"
TORCH = "torch_eigh_autograd"
CONFIGS: dict[str, tuple[str, dict]] = {
    "eigh_exact": ("eigh", {"backward": "exact"}),
    "eigh_taylor": ("eigh", {"backward": "taylor"}),
    "newton_schulz": ("newton_schulz", {}),
    "pade": ("pade", {}),
    BASELINE: ("eigh_autodiff", {}),
}


def parse_shape(text: str) -> tuple[int, int, int]:
    """'256x256x256' -> (256, 256, 256) = (batch, d, d)."""
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3 or parts[1] != parts[2]:
        raise argparse.ArgumentTypeError(f"shape must be BxDxD; got {text!r}")
    return parts


def random_spd(shape: tuple[int, int, int], seed: int = 0) -> jax.Array:
    """float32 SPD batch with eigenvalues spread over [1e-2, 1]."""
    b, d, _ = shape
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(b, d, d)))
    lam = np.geomspace(1.0, 1e-2, d)
    return jnp.asarray((q * lam) @ np.swapaxes(q, -1, -2), jnp.float32)


def time_interleaved(fns: dict[str, Callable], x: jax.Array, repeats: int) -> dict[str, list]:
    """Wall times of each ``fns[k](x)``, one warm-up call each, then ``repeats`` rounds.

    Rounds are interleaved (every function once per round) so that load from other
    processes on a shared machine hits all methods alike.
    """
    for fn in fns.values():
        jax.block_until_ready(fn(x))
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[key].append(time.perf_counter() - start)
    return times


def build_functions(p: jax.Array) -> dict[tuple[str, str], Callable]:
    """Jitted forward and forward+backward (grad of a linear loss of P^{1/2}) per method."""
    weight = jnp.asarray(np.random.default_rng(1).normal(size=p.shape[-2:]), p.dtype)
    fns = {}
    for name, (method, opts) in CONFIGS.items():
        fns[(name, "fwd")] = jax.jit(lambda a, m=method, o=opts: sqrtm(a, method=m, **o))
        loss = lambda a, m=method, o=opts: jnp.sum(sqrtm(a, method=m, **o) * weight)
        fns[(name, "fwd_bwd")] = jax.jit(jax.grad(loss))
    return fns


def build_torch_functions(p: jax.Array, device: str = "cpu") -> dict[tuple[str, str], Callable]:
    """Forward and forward+backward of ``torch.linalg.eigh`` P^{1/2} with plain autograd.

    Same input, eigenvalue clamp (float32 eps * lambda_max) and linear loss as
    :func:`build_functions`; the callables ignore their argument and synchronise the device.
    """
    import torch

    pt = torch.from_numpy(np.array(p)).to(device)
    weight = torch.from_numpy(np.random.default_rng(1).normal(size=p.shape[-2:])).to(pt)
    sync = torch.cuda.synchronize if pt.is_cuda else (lambda: None)

    def sqrtm_torch(a):
        lam, u = torch.linalg.eigh(a)
        floor = (torch.finfo(a.dtype).eps * lam[..., -1:]).detach()
        return (u * torch.clamp(lam, min=floor).sqrt()[..., None, :]) @ u.transpose(-1, -2)

    def fwd(_):
        with torch.no_grad():
            sqrtm_torch(pt)
        sync()

    def fwd_bwd(_):
        a = pt.detach().requires_grad_(True)
        torch.autograd.grad((sqrtm_torch(a) * weight).sum(), a)
        sync()

    return {(TORCH, "fwd"): fwd, (TORCH, "fwd_bwd"): fwd_bwd}


def run(shapes: list[tuple[int, int, int]], repeats: int, *, torch: bool = False,
        torch_device: str = "cpu") -> list[dict]:
    """Time every configuration on every shape; one row per (shape, method).

    Args:
      shapes: (batch, d, d) shapes.
      repeats: interleaved timed rounds.
      torch: also time ``torch.linalg.eigh`` with autograd (row method ``TORCH``).
      torch_device: the torch device.
    """
    rows = []
    names = [*CONFIGS, *([TORCH] if torch else [])]
    for shape in shapes:
        print(f"  timing {shape} ...", file=sys.stderr, flush=True)
        p = random_spd(shape)
        fns = build_functions(p)
        if torch:
            fns.update(build_torch_functions(p, torch_device))
        times = time_interleaved(fns, p, repeats)
        stats = {}
        for name in names:
            fwd, both = times[(name, "fwd")], times[(name, "fwd_bwd")]
            stats[name] = {"fwd_s": statistics.median(fwd), "fwd_bwd_s": statistics.median(both),
                           "fwd_min_s": min(fwd), "fwd_bwd_min_s": min(both)}
        base = stats[BASELINE]
        for name, r in stats.items():
            rows.append({
                "shape": list(shape), "method": name, **r,
                "fwd_vs_autodiff": r["fwd_s"] / base["fwd_s"],
                "fwd_bwd_vs_autodiff": r["fwd_bwd_s"] / base["fwd_bwd_s"],
                "fwd_bwd_over_fwd": r["fwd_bwd_s"] / r["fwd_s"],
                "min_fwd_bwd_vs_autodiff": r["fwd_bwd_min_s"] / base["fwd_bwd_min_s"],
                "min_fwd_bwd_over_fwd": r["fwd_bwd_min_s"] / r["fwd_min_s"],
            })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'shape':>14} {'method':>14} {'fwd ms':>9} {'fwd+bwd ms':>11} "
              f"{'fwd/base':>9} {'f+b/base':>9} {'f+b/fwd':>8} {'min fwd':>9} {'min f+b':>9} "
              f"{'minf+b/b':>9} {'minf+b/f':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{shape:>14} {r['method']:>14} {1e3 * r['fwd_s']:9.2f} {1e3 * r['fwd_bwd_s']:11.2f} "
            f"{r['fwd_vs_autodiff']:9.2f} {r['fwd_bwd_vs_autodiff']:9.2f} "
            f"{r['fwd_bwd_over_fwd']:8.2f} {1e3 * r['fwd_min_s']:9.2f} "
            f"{1e3 * r['fwd_bwd_min_s']:9.2f} {r['min_fwd_bwd_vs_autodiff']:9.2f} "
            f"{r['min_fwd_bwd_over_fwd']:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parses flags, times, prints the table, writes JSON; returns the rows."""
    from svdcond_jax.training import runtime

    settings = runtime.configure()
    # Kept on argparse (not absl.flags): a one-process micro-benchmark, no config file.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x64x64,256x256x256",
                        help="comma-separated BxDxD shapes (default: the paper's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--quick", action="store_true", help="3 repeats (overrides --repeats)")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    parser.add_argument("--torch", action="store_true",
                        help="also time torch.linalg.eigh with autograd (benchmarks extra)")
    parser.add_argument("--torch_device", default="cpu")
    args = parser.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    repeats = 3 if args.quick else args.repeats
    rows = run(shapes, repeats, torch=args.torch, torch_device=args.torch_device)
    print(f"backend={jax.default_backend()} devices={jax.devices()} repeats={repeats} "
          f"(float32, jit, ms are medians unless 'min'; base = {BASELINE})")
    print(format_table(rows))
    if args.json:
        meta = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                "jax": jax.__version__, "machine": platform.machine(), "repeats": repeats,
                "openblas_threads": settings["blas_threads"]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
