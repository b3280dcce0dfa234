r"""The optimizer rows of digits_optimizers.py on the covariance-pooling (GCP) digits task.

The task of experiments/configs/digits_gcp.py (a 1x1 Pre-SVD conv to 32 channels, the
32x32 covariance of 16 positions, its square root through the SVD meta-layer) with the six
rows of experiments/configs/digits_optimizers.py: svd (SGD), svd@adamw, svd@muon, svd@nog,
svd@nog+olr, svd+nog+olr@adamw, with its AdamW rate (1e-2). Every kernel but the
classifier `fc` counts as a matrix for muon/nog (the Pre-SVD conv `head/pre_svd_conv/kernel`
included).

Command (writes runs/optimizers_gcp/{table.md,table.json,conditioning.png}):
  svdcond-run --config=digits_optimizers_gcp
  from a checkout also:
  python -m experiments.run --config=experiments/configs/digits_optimizers_gcp.py
Reduced mode: add --quick (runs/optimizers_gcp_quick).

Expected run time: 13 min 33 s for the full sweep (120 runs of 220 steps; compile 6-10 s
per row, 4.6-5.3 s of training per run), measured 2026-12-07 on the 2-core development
machine (Intel Xeon, AVX-512). --quick (6 rows x 4 seeds x 2 folds x 6 steps, 48 runs) took
146 s while other jobs ran (load average ~9).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from svdcond_jax.training.config import load_config_file

digits_gcp = load_config_file(Path(__file__).with_name("digits_gcp.py"))
digits_optimizers = load_config_file(Path(__file__).with_name("digits_optimizers.py"))

TITLE = "Optimizers: covariance pooling (GCP), TinyResNet, digits"
WORKDIR = "runs/optimizers_gcp"
METHODS = digits_optimizers.METHODS
QUICK_METHODS = METHODS
SEEDS = digits_gcp.SEEDS
COMPARISONS = digits_optimizers.COMPARISONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The GCP digits config (method `svd`, optimizer `sgd`); `arg="runlocal"`: a few
    steps."""
    return digits_optimizers.with_rates(digits_gcp.get_config(arg))
