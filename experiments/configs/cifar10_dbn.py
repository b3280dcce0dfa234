r"""Decorrelated BN on CIFAR10 with ResNet-50 (Table 4; Appendix B.1).

The stem BN after the first 3x3 stride-1 conv of a CIFAR ResNet-50 is replaced by ZCA
whitening through the SVD meta-layer (eps = 1e-2); the Pre-SVD layer is that 3x3 conv.
Recipe (docs/applications.md): 350 epochs, batch 128, SGD lr 0.1 momentum 0.9 wd 5e-4,
lr /10 every 100 epochs; crop 32 pad 4 + flip; 10 seeds.

Command (every method row, 10 seeds; CIFAR10 prepared by tfds under --data_dir):
  python -m experiments.run --config=experiments/configs/cifar10_dbn.py \
      --workdir=runs/cifar10_dbn --config.data_dir=$HOME/tensorflow_datasets
One row, 3 seeds:
  python -m experiments.run --config=experiments/configs/cifar10_dbn.py \
      --methods=svd,svd+nog+ow+olr --seeds=0,1,2 --workdir=runs/cifar10_dbn
Tiny local check (a few steps; still needs the prepared dataset):
  python -m experiments.run --config=experiments/configs/cifar10_dbn.py --quick \
      --methods=svd --seeds=0 --workdir=/tmp/cifar10_quick

Expected run time: not measured here. Estimate from the paper's Table 6 (0.13-0.16 s per
step on an RTX A6000): 391 steps x 350 epochs = 137k steps, about 5-6 h per run on one
such GPU, i.e. ~75 GPU-hours for 15 methods x 1 seed (x10 for the paper's 10 seeds).

Paper (validation error %, mean +- std (min) over 10 runs, Table 4): SVD 4.35 +- 0.09
(4.17); SVD+SN 4.31 +- 0.10 (4.15); SVD+OL 4.28 +- 0.07 (4.23); SVD+NOG+OW 4.09 +- 0.07
(4.01); SVD+NOG+OW+OLR 3.93 +- 0.09 (3.85); Newton-Schulz 4.20 +- 0.11 (4.11).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from svdcond_jax.training.config import load_config_file
from svdcond_jax.training.methods import METHODS as _ALL_METHODS

cifar100_dbn = load_config_file(Path(__file__).with_name("cifar100_dbn.py"))

TITLE = "Decorrelated BN, ResNet-50, CIFAR10 (Table 4)"
METHODS = _ALL_METHODS
SEEDS = tuple(range(10))
# Table 4's CIFAR10 column (cells we could not read off the paper are left out).
PAPER = {
    "svd": "4.35 ± 0.09 (4.17)",
    "svd+sn": "4.31 ± 0.10 (4.15)",
    "svd+ol": "4.28 ± 0.07 (4.23)",
    "svd+nog+ow": "4.09 ± 0.07 (4.01)",
    "svd+nog+ow+olr": "3.93 ± 0.09 (3.85)",
    "newton_schulz": "4.20 ± 0.11 (4.11)",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CIFAR100 recipe on CIFAR10; `arg="runlocal"` gives a few-step local run."""
    config = cifar100_dbn.get_config(arg)
    config.dataset = "cifar10"
    return config
