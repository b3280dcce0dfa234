r"""Demo, second application: global covariance pooling (GCP) on the embedded digits.

The GCP network of Table 5 scaled down to the offline digits: TinyResNet (16-32 channels,
one grey channel at 8x8) whose global average pool is replaced by the covariance-pooling
head: a 1x1 Pre-SVD conv to `gcp_dim=32` channels + BN + ReLU, the 32x32 covariance of
the 4x4 = 16 positions of each image, its matrix square root through the SVD meta-layer,
and the upper triangle into the classifier. As with ResNet-18 on ImageNet (49 positions,
256 channels), the feature dimension exceeds the number of positions, so every image's
covariance is singular (rank <= 15 < 32) for every method: kappa(P) is not a number, the
tables give the rank and kappa on the non-zero spectrum instead. Table 5's columns:
validation error and SVD failures (non-finite steps, skipped), for svd, svd_autodiff
(plain autodiff through eigh), svd+nog+olr and newton_schulz; the demo's paired design
(5 folds x 4 seeds, every image validated once per seed; digits_demo.py).

Command (prints the table, writes runs/demo_gcp/{table.md,table.json,conditioning.png}):
  svdcond-demo --config=digits_gcp
  (from a checkout also: python -m experiments.demo --config=experiments/configs/digits_gcp.py)
Reduced mode: add --quick (runs/demo_gcp_quick).

Expected run time: see DEMO_WALL_NOTE (measured on the 2-core development machine).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from svdcond_jax.training.config import load_config_file

digits_demo = load_config_file(Path(__file__).with_name("digits_demo.py"))

TITLE = "Demo: covariance pooling (GCP), TinyResNet, digits (32-dim covariance, 16 positions)"
WORKDIR = "runs/demo_gcp"
METHODS = ("svd", "svd_autodiff", "svd+nog+olr", "newton_schulz")
QUICK_METHODS = ("svd", "svd+nog+olr")
SEEDS = digits_demo.SEEDS
DEMO_WALL_NOTE = (
    "about 9 min: 8 min 41 s elapsed (/usr/bin/time) for the 4 methods x 4 seeds x 5 folds "
    "(80 runs of 220 steps) after the decorrelated-BN demo (its compilation cache), on the "
    "2-core development machine (Intel Xeon, AVX-512, quiet), 2026-12-07; 25 s compiling, "
    "393 s training"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The digits demo's recipe with the GCP head; `arg="runlocal"`: a few steps."""
    config = digits_demo.get_config(arg)
    config.task = "gcp"
    config.gcp_dim = 32
    return config
