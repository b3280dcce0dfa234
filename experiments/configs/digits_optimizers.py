r"""Optimizers around NOG/OLR on the decorrelated-BN digits task (issue: NOG beyond SGD).

The digits demo's task, recipe and paired design (experiments/configs/digits_demo.py:
TinyResNet, 16-32 channels, one grey channel at 8x8, decorrelated-BN stem, 20 epochs, the
SGD rate's step decay at epochs 10 and 15, 5 folds x 4 seeds) with six optimizer rows, all
on the `svd` model:

  svd                the paper's setting: torch-style SGD everywhere (lr 0.1, momentum 0.9,
                     weight decay 5e-4), no NOG/OLR
  svd@adamw          optax.adamw everywhere (adamw_learning_rate 1e-2, weight decay 1e-4)
  svd@muon           optax.contrib.muon on every conv/dense kernel but the head (lr 0.02,
                     beta 0.95, Nesterov), its AdamW (1e-2) for the rest
  svd@nog            NOG (polar_express) on every conv/dense kernel but the head, SGD
  svd@nog+olr        the same with per-layer OLR (each kernel's eta capped by lr 0.1)
  svd+nog+olr@adamw  the paper's Pre-SVD NOG + OLR (SGD, cap 0.1) next to AdamW for the rest

Every rate follows the same step decay; the fields are those of
svdcond_jax/training/config.py (`--config.adamw_learning_rate=3e-4` etc. override them).
AdamW's rate was chosen on seeds 0 and 1 of the fixed 300-image hold-out (cv_folds=0, 220
steps; measured on the 2-core development machine): 1e-3 (the library default) left the
network undertrained (svd@adamw 29-31 % error, svd+nog+olr@adamw 28-29 %), 3e-3 gave 3.0 /
3.3-3.7 %, 1e-2 1.0-1.3 / 2.3-3.0 %, 3e-2 0.7-1.0 / 1.0-1.3 %; 1e-2 is used (3e-2 is not
separable from it on two seeds). Muon at 0.02, 0.05 and 0.1 gave 1.0-1.7 %; 0.02 is kept.

Command (writes runs/optimizers/{table.md,table.json,conditioning.png}):
  svdcond-run --config=digits_optimizers
  from a checkout also:
  python -m experiments.run --config=experiments/configs/digits_optimizers.py
Covariance pooling instead: digits_optimizers_gcp. Reduced mode (a few steps per row):
add --quick (runs/optimizers_quick).

Expected run time: 6 min 32 s for the full sweep (6 rows x 4 seeds x 5 folds of 220
steps, 120 runs; compile 3-10 s per row, 2.1-2.7 s of training per run), measured
2026-12-07 on the 2-core development machine (Intel Xeon, AVX-512, quiet). --quick (6 rows
x 4 seeds x 2 folds x 6 steps, 48 runs) took 124 s while other jobs ran (load ~9).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from svdcond_jax.training.config import load_config_file

digits_demo = load_config_file(Path(__file__).with_name("digits_demo.py"))

TITLE = "Optimizers: decorrelated BN, TinyResNet, digits (SGD, AdamW, Muon, NOG everywhere)"
WORKDIR = "runs/optimizers"
METHODS = ("svd", "svd@adamw", "svd@muon", "svd@nog", "svd@nog+olr", "svd+nog+olr@adamw")
QUICK_METHODS = METHODS
SEEDS = digits_demo.SEEDS
# Paired comparisons beyond "vs svd" (error(a) - error(b), same seeds and folds): NOG on
# every kernel against Muon, OLR's share, the paper's Pre-SVD NOG+OLR inside an AdamW run,
# and Muon against AdamW.
COMPARISONS = (
    ("svd@nog", "svd@muon"),
    ("svd@nog+olr", "svd@muon"),
    ("svd@nog+olr", "svd@nog"),
    ("svd+nog+olr@adamw", "svd@adamw"),
    ("svd@muon", "svd@adamw"),
)


def with_rates(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The AdamW rate chosen above (also the rate of Muon's AdamW part)."""
    config.adamw_learning_rate = 1e-2
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The digits demo's config (method `svd`, optimizer `sgd`); `arg="runlocal"`: a few
    steps."""
    return with_rates(digits_demo.get_config(arg))
