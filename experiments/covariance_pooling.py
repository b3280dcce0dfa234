"""Global covariance pooling on ImageNet with ResNet-18 (Table 5, Fig. 5).

A thin entry point over `experiments.run` whose `--config` defaults to
experiments/configs/imagenet_gcp.py:

    python -m experiments.covariance_pooling --workdir=runs/imagenet_gcp \
        --config.data_dir=/data/tensorflow_datasets [--methods=svd,svd+nog+ow+olr] [--quick]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from . import flags as exp_flags
from . import run

CONFIG = Path(__file__).resolve().parent / "configs" / "imagenet_gcp.py"


def main(argv: Sequence[str] | None = None) -> str:
    """Runs `experiments.run` with the ImageNet GCP config as the default `--config`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run.main(argv, config_default=str(CONFIG), doc=__doc__)


def cli() -> None:
    """The ``svdcond-gcp`` console script."""
    exp_flags.run_app(main)


if __name__ == "__main__":
    cli()
