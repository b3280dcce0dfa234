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
(plain autodiff through eigh), svd+nog+olr and newton_schulz; 3 seeds each.

Command (prints the table, writes runs/demo_gcp/{table.md,table.json,conditioning.png}):
  python -m experiments.demo --config=experiments/configs/digits_gcp.py
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
SEEDS = (0, 1, 2)
DEMO_WALL_NOTE = (
    "about 4 min: 238 s elapsed (/usr/bin/time) for the 4 methods x 3 seeds (220 steps each) "
    "on the 2-core development machine with other jobs running; of it 33 s compiling "
    "(4.9-13.1 s for each method's first seed, 0.2-0.3 s for the others) and 155 s training. "
    "With the decorrelated-BN demo (379 s) the two exceed 10 min, so this one is separate"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The digits demo's recipe with the GCP head; `arg="runlocal"`: a few steps."""
    config = digits_demo.get_config(arg)
    config.task = "gcp"
    config.gcp_dim = 32
    return config
