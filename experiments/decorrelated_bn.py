"""Decorrelated BN on CIFAR10/CIFAR100 with ResNet-50 (Tables 1-4, Figs. 1-4).

A thin entry point over `experiments.run` whose `--config` defaults to the CIFAR config
of `--dataset`:

    python -m experiments.decorrelated_bn --dataset=cifar100 --workdir=runs/cifar100_dbn \
        [--methods=svd,svd+nog+ow+olr] [--seeds=0,1,2] [--config.data_dir=...] [--quick]

is `python -m experiments.run --config=experiments/configs/cifar100_dbn.py ...`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from . import flags as exp_flags
from . import run

CONFIGS = Path(__file__).resolve().parent / "configs"
DATASETS = ("cifar10", "cifar100")


def _dataset(argv: list[str]) -> tuple[str, list[str]]:
    """Takes `--dataset` out of argv (it picks the default config, so it is read before
    the config flags are defined; absl has no two-stage parsing): our own small scan."""
    dataset, rest, items = "cifar100", [], list(argv)
    while items:
        item = items.pop(0)
        if item == "--dataset":
            if not items:
                raise SystemExit("error: --dataset needs a value (cifar10 or cifar100)")
            dataset = items.pop(0)
        elif item.startswith("--dataset="):
            dataset = item.partition("=")[2]
        else:
            rest.append(item)
    if dataset not in DATASETS:
        raise SystemExit(f"error: --dataset={dataset!r}; valid: {', '.join(DATASETS)}")
    return dataset, rest


def main(argv: Sequence[str] | None = None) -> str:
    """Maps `--dataset=cifar10|cifar100` to its config and runs `experiments.run`."""
    dataset, rest = _dataset(list(sys.argv[1:] if argv is None else argv))
    return run.main(rest, config_default=str(CONFIGS / f"{dataset}_dbn.py"),
                    doc=__doc__)


def cli() -> None:
    """The ``svdcond-dbn`` console script."""
    exp_flags.run_app(main)


if __name__ == "__main__":
    cli()
