"""Fetch the wheels the GPU check carries to a machine that has no package registry.

    python -m benchmarks.carry_wheels                 # -> wheels/*.whl, names and sizes

The GPU image lacks ml_collections, which the training library's config needs; it is
pure Python (its dependencies, absl-py and PyYAML, are on the image). This downloads the
pinned wheels of :data:`CARRIED` without their dependencies (``pip download --no-deps
--only-binary=:all:``) into ``wheels/`` (git-ignored; name it in the GPU run's carried
paths), checks that each is a pure-Python ``py3-none-any`` wheel (Python imports such a
wheel straight from the zip file, so ``benchmarks/gpu_check.py`` puts it on the path and
nothing is installed on the GPU machine) and prints each with its size. Already present
wheels are kept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> pinned version (the one the development environment and the tests use).
CARRIED = {"ml_collections": "1.1.0"}
MAX_BYTES = 1 << 20  # carried wheels must stay small (the working tree travels, 64 MiB)


def wheel_path(directory: Path, name: str, version: str) -> Path | None:
    """The pure-Python wheel of ``name==version`` in ``directory``, if there."""
    found = sorted(directory.glob(f"{name.replace('-', '_')}-{version}-py3-none-any.whl"))
    return found[0] if found else None


def fetch(directory: Path) -> list[Path]:
    """Downloads the missing wheels of :data:`CARRIED` into ``directory``; returns all.

    Raises:
      RuntimeError: pip failed, or a wheel is not pure Python or is larger than 1 MiB.
    """
    directory.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, version in CARRIED.items():
        path = wheel_path(directory, name, version)
        if path is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", str(directory), f"{name}=={version}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            path = wheel_path(directory, name, version)
            if done.returncode or path is None:
                raise RuntimeError(f"{' '.join(cmd)} gave no pure-Python wheel "
                                   f"(exit {done.returncode}):\n{done.stderr[-2000:]}")
        if path.stat().st_size > MAX_BYTES:
            raise RuntimeError(f"{path.name} is {path.stat().st_size} bytes (> {MAX_BYTES})")
        wheels.append(path)
    return wheels


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Fetches the wheels and prints each with its size."""
    # argparse (not absl.flags): absl may not be installed where this runs.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default=str(ROOT / "wheels"), help="wheel directory")
    args = parser.parse_args(argv)
    wheels = fetch(Path(args.dest))
    for w in wheels:
        print(f"{w}  {w.stat().st_size / 1024:.0f} KiB")
    print(f"total {sum(w.stat().st_size for w in wheels) / 1024:.0f} KiB")
    return wheels


if __name__ == "__main__":
    main()
