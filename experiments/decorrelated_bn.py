"""Decorrelated BN on CIFAR10/CIFAR100 with ResNet-50 (Tables 1-4, Figs. 1-4).

A thin entry point over `experiments.run` with the CIFAR configs:

    python -m experiments.decorrelated_bn --dataset cifar100 --workdir runs/cifar100_dbn \
        [--methods svd,svd+nog+ow+olr] [--seeds 0,1,2] [--set data_dir=...] [--quick]

is `python -m experiments.run --config experiments/configs/cifar100_dbn.py ...`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import run

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: Sequence[str] | None = None) -> str:
    """Maps `--dataset cifar10|cifar100` to its config and runs `experiments.run`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    dataset = "cifar100"
    if "--dataset" in argv:
        i = argv.index("--dataset")
        dataset = argv[i + 1]
        del argv[i:i + 2]
    if dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"--dataset={dataset!r}; valid: cifar10, cifar100")
    return run.main(["--config", str(CONFIGS / f"{dataset}_dbn.py"), *argv])


if __name__ == "__main__":
    main()
