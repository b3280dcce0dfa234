"""Render ``benchmarks/suite.py`` results files as the README's performance section.

    python -m benchmarks.render benchmarks/results/*.json              # Markdown to stdout
    python -m benchmarks.render benchmarks/results/*.json --out perf.md

One subsection per results file (device, date, versions and the command that produced
it), with whichever parts the file holds: Table 6 per precision with the overhead
targets, the comparison with PyTorch, MFU, the meta-layer against ``torch.linalg.eigh``
and memory per method.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.step_vs_torch import format_tables as torch_tables


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _header(report: dict[str, Any]) -> list[str]:
    m, v = report["machine"], report["versions"]
    device = (m["device_kind"] if m["platform"] != "cpu"
              else f"CPU only: {m['host_cpu']}, {m['cores']} cores")
    args = report["args"]
    lines = [f"### {device}: {args['model']}, batch {args['batch']}", "",
             f"Measured {m['date']}; load average {m['load_avg'][0]:.1f} at the start, "
             f"{m.get('load_avg_end', [float('nan')])[0]:.1f} at the end; "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             f"Command: `{report['command']}`", ""]
    if m["platform"] == "cpu":
        lines += ["(A CPU run at a small batch: it checks the suite end to end; the "
                  "paper's targets are for a GPU.)", ""]
    return lines


def _table6(part: dict[str, Any], precision: str, args: dict[str, Any]) -> list[str]:
    res = part["results"]
    lines = [f"Table 6 ({precision}): one training step, median of {args['rounds']} "
             f"interleaved rounds x {args['repeats']} calls.", "",
             "| Method | FP (ms) | BP (ms) | Step (ms) | Step / bn | GFLOP / step | "
             "TFLOP/s | step memory (MB) | compile (s) |", "|---" * 9 + "|"]
    base = res.get("bn", {}).get("step_ms")
    for m, r in res.items():
        ratio = "–" if not base else f"{r['step_ms'] / base:.3f}"
        lines.append(f"| {m} | {r['fp_ms']:.1f} | {r['bp_ms']:.1f} | {r['step_ms']:.1f} | "
                     f"{ratio} | {_f(r.get('step_gflops'))} | "
                     f"{_f(r.get('step_tflops_per_s'), '.3f')} | "
                     f"{_f(r.get('step_memory_mb'), '.0f')} | {_f(r.get('compile_s'))} |")
    lines.append("")
    for t in part["targets"]:
        lines.append(f"- {t['name']}: {t['overhead_pct']:+.1f}% (target <= "
                     f"{t['target_pct']:g}%, paper +{t['paper_pct']:g}%): "
                     f"{'meets' if t['meets_target'] else 'misses'} the target")
    return [*lines, ""]


def _mfu(mfu: dict[str, Any]) -> list[str]:
    lines = ["MFU of the plain-BN step (FLOPs from XLA's cost analysis):", "",
             "| precision | batch | step (ms) | GFLOP / step | achieved TFLOP/s | "
             "dense bf16 peak | MFU |", "|---" * 7 + "|"]
    for precision, r in mfu.items():
        mfu_pct = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {precision} | {r['batch']} | {r['step_ms']:.1f} | "
                     f"{_f(r['step_gflops'])} | {_f(r['achieved_tflops'], '.3f')} | "
                     f"{_f(r['peak_bf16_tflops'])} | {mfu_pct} |")
    return [*lines, ""]


def _meta(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Meta-layer P^{1/2}, float32 (medians; ratio to plain autodiff through "
             "`jnp.linalg.eigh`):", "",
             "| shape | method | fwd (ms) | fwd+bwd (ms) | fwd+bwd / autodiff | "
             "fwd+bwd / torch |", "|---" * 6 + "|"]
    torch = {tuple(r["shape"]): r["fwd_bwd_s"] for r in rows
             if r["method"] == "torch_eigh_autograd"}
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        vs_torch = torch.get(tuple(r["shape"]))
        lines.append(f"| {shape} | {r['method']} | {1e3 * r['fwd_s']:.2f} | "
                     f"{1e3 * r['fwd_bwd_s']:.2f} | {r['fwd_bwd_vs_autodiff']:.2f} | "
                     f"{'–' if not vs_torch else format(r['fwd_bwd_s'] / vs_torch, '.2f')} |")
    return [*lines, ""]


def _memory(memory: dict[str, Any]) -> list[str]:
    lines = ["Memory per step (XLA's memory analysis of the compiled step: arguments + "
             "outputs + temporaries - donated; device peak where reported):", "",
             "| precision | method | step memory (MB) | vs bn | device peak (MB) |",
             "|---" * 5 + "|"]
    for precision, rows in memory.items():
        for m, r in rows.items():
            lines.append(f"| {precision} | {m} | {_f(r['step_memory_mb'], '.0f')} | "
                         f"{_f(r['vs_bn'], '.3f')} | {_f(r['device_peak_mb'], '.0f')} |")
    return [*lines, ""]


def render_one(report: dict[str, Any]) -> str:
    """Markdown for one results file."""
    lines = _header(report)
    for precision, part in report.get("table6", {}).items():
        lines += _table6(part, precision, report["args"])
    for part in report.get("torch", {}).values():
        lines += [torch_tables(part)]
        for row in part["rows"]:
            if row.get("speedup_vs_faster_torch") is not None:
                lines.append(f"- `{row['method']}`: our step has "
                             f"{row['speedup_vs_faster_torch']:.2f}x the throughput of the "
                             "faster PyTorch variant (goal on a GPU: >= 1.5x)")
        lines.append("")
    if "mfu" in report:
        lines += _mfu(report["mfu"])
    if "meta_layer" in report:
        lines += _meta(report["meta_layer"])
    if "memory" in report:
        lines += _memory(report["memory"])
    return "\n".join(lines)


def render(reports: Sequence[dict[str, Any]]) -> str:
    """The performance section for several results files."""
    return "## Performance\n\n" + "\n".join(render_one(r) for r in reports)


def main(argv: Sequence[str] | None = None) -> str:
    """Reads results files, prints or writes the Markdown section; returns it."""
    # Kept on argparse (not absl.flags): a positional input file, no config, no jax.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="results JSON files of benchmarks.suite")
    parser.add_argument("--out", default=None, help="write here instead of stdout")
    args = parser.parse_args(argv)
    text = render([json.loads(Path(f).read_text()) for f in sorted(args.files)])
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
