"""Where a number was measured: machine, device, library versions, code revision, date.

Every run of a sweep stores this next to its config (``provenance.json``), tables quote it
beside their numbers, and the benchmarks record it in their JSON: a number from another
CPU, another XLA vector ISA (``XLA_FLAGS``), another jax or another revision of this code
can differ in round-off, so it has to say where it came from.

Example:
    >>> facts = collect()
    >>> sorted(facts)[:4]
    ['cpu', 'cpu_count', 'date', 'device_kind']
    >>> line(facts).startswith("measured ")
    True
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
_ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for entry in f:
                if entry.startswith("model name"):
                    return entry.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(root: str | Path = _ROOT) -> str | None:
    """``<short hash>`` of the checkout holding this code (``+dirty`` with uncommitted
    changes), or None outside a git checkout (an installed package)."""
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """The measurement's facts as a JSON-ready dict.

    Keys: date (UTC, ISO 8601), cpu, cpu_count, device_kind and platform (jax's first
    device), xla_flags (the ``XLA_FLAGS`` environment variable, e.g. a lowered vector ISA),
    python, the versions of jax, jaxlib, flax, optax and numpy, svdcond_jax (the package
    version) and revision (git, or None).
    """
    import jax

    device = jax.devices()[0]
    facts: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
    }
    facts.update({name: package_version(name) for name in PACKAGES})
    facts["svdcond_jax"] = package_version("svdcond-jax")
    facts["revision"] = git_revision()
    return facts


def line(facts: dict[str, Any]) -> str:
    """One human line: 'measured <date> on <cpu> (<device>), jax ..., revision ...'."""
    versions = ", ".join(f"{n} {facts.get(n)}" for n in PACKAGES if facts.get(n))
    isa = f", XLA_FLAGS={facts['xla_flags']}" if facts.get("xla_flags") else ""
    return (f"measured {facts.get('date')} on {facts.get('cpu')} x{facts.get('cpu_count')} "
            f"({facts.get('platform')}: {facts.get('device_kind')}{isa}), {versions}, "
            f"revision {facts.get('revision') or 'unknown'}")
