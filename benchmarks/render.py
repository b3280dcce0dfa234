"""Render a GPU check's results (``benchmarks/gpu_check.py``) as Markdown.

    python -m benchmarks.render benchmarks/results/gpu_check            # to stdout
    python -m benchmarks.render benchmarks/results/gpu_check --out perf.md

Reads ``summary.json`` and the part files of a results directory. One section: device,
date, versions and the command; a table of the parts (status, estimate, measured time,
why skipped); then whichever parts ran: the smoke checks, Table 6 per precision with
the overhead targets, the meta-layer against ``torch.linalg.eigh``, the comparison with
PyTorch, MFU. ``gpu_check`` writes the same text to ``summary.md`` when it ends.
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


def _header(summary: dict[str, Any]) -> list[str]:
    device = (summary["device_kind"] if summary["platform"] != "cpu"
              else "CPU (dry run)" if summary["tiny"] else "CPU")
    lines = [f"### GPU check: {device}", "",
             f"Measured {summary['date']}, jax {summary['jax']}; budget "
             f"{summary['budget_s']:.0f} s, used {summary['elapsed_s']:.0f} s "
             f"({summary['startup_s']:.0f} s start-up)"
             + (f"; carried wheels: {', '.join(summary['wheels'])}" if summary["wheels"] else "")
             + ".", "", f"Command: `{summary['command']}`", ""]
    if summary["tiny"]:
        lines += ["(The CPU dry run: tiny sizes, every part's code path; its times say "
                  "nothing about a GPU.)", ""]
    lines += ["| part | status | estimate (s) | took (s) | note |", "|---|---|---:|---:|---|"]
    for r in summary["parts"]:
        lines.append(f"| {r['part']} | {r['status']} | {_f(r.get('estimate_s'), '.0f')} | "
                     f"{_f(r.get('seconds'), '.0f')} | {r.get('reason') or ''} |")
    inner = [s for s in summary["skipped"] if "item" in s]
    if inner:
        lines += ["", "Skipped inside parts that ran:", ""]
        lines += [f"- {s['part']} / {s['item']}: {s['reason']}" for s in inner]
    imported = [m for m in ("tensorflow", "tensorflow_datasets", "clu")
                if summary["imported"].get(m)]
    lines += ["", f"TensorFlow, TFDS, clu imported: {', '.join(imported) or 'none'}.", ""]
    return lines


def _smoke(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    lines = ["#### Environment and correctness smoke", "",
             f"{env['device_count']} x {env['device_kind']} ({env['platform']}, "
             f"{env['platform_version']}); jax {env['jax']}, jaxlib {env['jaxlib']}, "
             f"Python {env['python']}; host {env['host_cpu']}, {env['cores']} cores.", ""]
    cuda = {k: v for k, v in env["packages"].items() if "cuda" in k.lower()
            or k.lower().startswith("nvidia")}
    if cuda:
        lines += ["CUDA packages: " + ", ".join(f"{k} {v}" for k, v in cuda.items()), ""]
    fd = result["eigh_backward"]
    lines += [f"Exact eigh backward vs float64 central differences on the device "
              f"(shape {fd['shape']}, h = {fd['h']:g}; tolerances {fd['fd_tolerance']:g} "
              f"and {fd['f32_tolerance']:g}): **{'passed' if fd['passed'] else 'FAILED'}**", "",
              "| function | max rel. error vs FD | float32 grad vs float64 |", "|---|---:|---:|"]
    for name in ("sqrtm", "inv_sqrtm"):
        lines.append(f"| {name} | {max(fd[name]['fd_rel_errors']):.1e} | "
                     f"{fd[name]['f32_rel_error']:.1e} |")
    lines += ["", "eigh as XLA compiles it (`jnp.linalg.eigh`, float32), and each "
              "implementation's median time:", "",
              "| shape | custom call | algorithm attr. | reading | default (ms) | QR (ms) | "
              "Jacobi (ms) |", "|---|---|---|---|---:|---:|---:|"]
    for row in result["eigh_algorithm"]:
        t = row["timings_ms"]
        jacobi = _f(t.get("jacobi"), ".3f") if "jacobi" in t else (
            "refused" if "jacobi" in row["errors"] else "–")
        lines.append(f"| {'x'.join(map(str, row['shape']))} | {', '.join(row['targets'])} | "
                     f"{_f(row['algorithm_attr'], 'd')} | {row['reading']} | "
                     f"{_f(t.get('default'), '.3f')} | {_f(t.get('qr'), '.3f')} | {jacobi} |")
    d = result["digits"]
    lines.append("")
    if "skipped" in d:
        lines.append(f"Digits steps: skipped ({d['skipped']}).")
    else:
        lines.append(f"{d['steps']} digits steps of `{d['method']}` ({d['model']}, batch "
                     f"{d['batch']}): loss {d['losses'][0]:.3f} -> {d['losses'][-1]:.3f}, "
                     f"{d['non_finite_steps']} non-finite steps, first step after "
                     f"{d['first_step_s']:.1f} s (compile), "
                     f"{'passed' if d['passed'] else 'FAILED'}.")
    return [*lines, ""]


def _table6(part: dict[str, Any]) -> list[str]:
    res = part["results"]
    lines = [f"#### Table 6, {part['precision']}: {part['model']}, batch {part['batch']}", "",
             f"One training step, median of {part['rounds']} interleaved rounds x "
             f"{part['repeats']} calls; compile (s) is cold unless loaded from the cache.", "",
             "| Method | FP (ms) | BP (ms) | Step (ms) | Step / bn | GFLOP / step | "
             "TFLOP/s | step memory (MB) | compile (s) | paper FP / BP (ms) |",
             "|---" * 10 + "|"]
    base = res.get("bn", {}).get("step_ms")
    for m, r in res.items():
        ratio = "–" if not base else f"{r['step_ms'] / base:.3f}"
        paper = part["paper_ms"].get(m)
        lines.append(f"| {m} | {r['fp_ms']:.1f} | {r['bp_ms']:.1f} | {r['step_ms']:.1f} | "
                     f"{ratio} | {_f(r.get('step_gflops'))} | "
                     f"{_f(r.get('step_tflops_per_s'), '.2f')} | "
                     f"{_f(r.get('step_memory_mb'), '.0f')} | {_f(r.get('compile_s'))}"
                     f"{' (cache)' if r.get('from_cache') else ''} | "
                     f"{f'{paper[0]} / {paper[1]}' if paper else '–'} |")
    lines.append("")
    for t in part["targets"]:
        lines.append(f"- {t['name']}: {t['overhead_pct']:+.1f}% (target <= "
                     f"{t['target_pct']:g}%, paper +{t['paper_pct']:g}%): "
                     f"{'meets' if t['meets_target'] else 'misses'} the target")
    for d in part["dropped"]:
        lines.append(f"- {d['method']}: skipped ({d['reason']})")
    return [*lines, ""]


def _meta(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    lines = ["#### Meta-layer P^{1/2}, float32", "",
             f"Medians of {result['repeats']} interleaved rounds; ratios to plain autodiff "
             f"through `jnp.linalg.eigh` and to `torch.linalg.eigh` + autograd on "
             f"{result['torch_device']}"
             + (f" (PyTorch skipped: {result['torch_skipped']})" if "torch_skipped" in result
                else "") + ".", "",
             "| shape | method | fwd (ms) | fwd+bwd (ms) | fwd+bwd / autodiff | "
             "fwd+bwd / torch |", "|---" * 6 + "|"]
    torch = {tuple(r["shape"]): r["fwd_bwd_s"] for r in rows
             if r["method"] == "torch_eigh_autograd"}
    for r in rows:
        vs_torch = torch.get(tuple(r["shape"]))
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['method']} | "
                     f"{1e3 * r['fwd_s']:.2f} | {1e3 * r['fwd_bwd_s']:.2f} | "
                     f"{r['fwd_bwd_vs_autodiff']:.2f} | "
                     f"{'–' if not vs_torch else format(r['fwd_bwd_s'] / vs_torch, '.2f')} |")
    return [*lines, ""]


def _torch(report: dict[str, Any]) -> list[str]:
    lines = ["#### Our step against PyTorch", "", f"torch.compile backend: "
             f"{report.get('compile_backend', 'inductor')}.", ""]
    if report["rows"]:
        lines.append(torch_tables(report))
    for row in report["rows"]:
        if row.get("speedup_vs_faster_torch") is not None:
            lines.append(f"- `{row['method']}`: our step has "
                         f"{row['speedup_vs_faster_torch']:.2f}x the throughput of the "
                         "faster PyTorch variant (goal on a GPU: >= 1.5x)")
    for row in report.get("skipped_rows", []):
        lines.append(f"- `{row['method']}`: skipped ({row['reason']})")
    return [*lines, ""]


def _mfu(r: dict[str, Any]) -> list[str]:
    mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return ["#### MFU of the plain-BN step", "",
            "FLOPs from XLA's cost analysis of the compiled step; MFU against the device's "
            "dense bf16 peak.", "",
            "| precision | batch | step (ms) | GFLOP / step | achieved TFLOP/s | images/s | "
            "dense bf16 peak (TFLOP/s) | MFU |", "|---" * 8 + "|",
            f"| {r['precision']} | {r['batch']} | {r['step_ms']:.1f} | "
            f"{_f(r['step_gflops'])} | {_f(r['achieved_tflops'], '.2f')} | "
            f"{r['images_per_s']:.0f} | {_f(r['peak_bf16_tflops'])} | {mfu} |", ""]


def render_check(summary: dict[str, Any], parts: dict[str, dict[str, Any]]) -> str:
    """Markdown for one GPU check: its summary and the results of the parts that ran."""
    lines = _header(summary)
    for key, record in parts.items():
        result = record.get("result")
        if record.get("status") not in ("ok", "failed") or not isinstance(result, dict):
            continue
        if key == "a_smoke":
            lines += _smoke(result)
        elif "table6" in key:
            lines += _table6(result)
        elif key == "c_meta_layer":
            lines += _meta(result)
        elif key == "d_torch_step":
            lines += _torch(result)
        elif key == "e_mfu":
            lines += _mfu(result)
    return "\n".join(lines)


def read_check(directory: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The summary and part files of a results directory."""
    summary = json.loads((directory / "summary.json").read_text())
    parts = {}
    for record in summary["parts"]:
        path = directory / f"{record['part']}.json"
        if path.exists():
            parts[record["part"]] = json.loads(path.read_text())
    return summary, parts


def main(argv: Sequence[str] | None = None) -> str:
    """Reads a results directory, prints or writes its Markdown; returns it."""
    # Kept on argparse (not absl.flags): a positional input, no config, no jax.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="a results directory of benchmarks.gpu_check")
    parser.add_argument("--out", default=None, help="write here instead of stdout")
    args = parser.parse_args(argv)
    text = render_check(*read_check(Path(args.directory)))
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
