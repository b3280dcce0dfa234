r"""The README demo: decorrelated BN on the embedded digits dataset (offline, 2 CPU cores).

scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn, so no
download) at their native 8x8 resolution, as ONE grey channel (`input_channels=1`: the
pipeline repeats grey to 3 channels for the CIFAR layout, the model keeps the first).
TinyResNet (2 stages, 16-32 channels, CIFAR-style 3x3 stride-1 stem) has its stem BN
replaced by decorrelated BN, so the Pre-SVD layer is the stem conv and its output
covariance is what the meta-layer whitens (eps=1e-2). The 3x3 stem sees 9-dimensional
patches, so its 16-channel output covariance has rank <= 9 < 16: singular, like the
paper's CIFAR stem (rank <= 27 < 64; docs/conditioning.md), unless the stem is orthogonal
(SOC, "+ow"); its weight gradient (9 x 16) is full rank. Same recipe shape as the paper's
CIFAR one (SGD lr 0.1 momentum 0.9 wd 5e-4, step decay), scaled down: 20 epochs of 11
steps (batch 128).

Paired design (docs/conditioning.md, experiments/tables.py): 5-fold cross-validation x 4
seeds. Each seed trains 5 runs, fold f validating the f-th fifth of the 1,797 images (359
or 360) and training on the other 1,437-1,438, so every image is validated once per seed.
For a seed and fold every method starts from the same initial parameters (where the
parameter trees coincide) and sees the same batches in the same order, so methods are
compared by the paired difference over the 20 (seed, fold) runs, with an exact sign-flip
95% interval. Measured on this task (a pilot of 2 seeds x 5 folds), the paired
difference of one run has a standard deviation of 0.9-1.3 points, so 20 pairs give an
interval of about +-0.45 points: a 0.5-point difference is about at the edge of what the
demo can separate, a 1-point difference is well inside it.

Command (the README's main command; prints the table, writes runs/demo/{table.md,
table.json,conditioning.png}):
  svdcond-demo                   (from a checkout also: python -m experiments.demo)
which is the same as
  svdcond-run --config=digits_demo
Reduced mode for the test suite: svdcond-demo --quick (runs/demo_quick).

Expected run time: see DEMO_WALL_NOTE (measured on the 2-core development machine).

What to look for: the "vs svd" column (the paired difference and its interval: does it
exclude 0?), the conditioning columns and `conditioning.png` -- kappa(P + eps*I) of the
matrix the decorrelated BN decomposes, the raw covariance's rank and kappa on its non-zero
spectrum -- per method, the SVD-failure column, and the Pre-SVD weight-norm growth under
NOG (docs/conditioning.md).
"""

from __future__ import annotations

import ml_collections

from svdcond_jax.training.config import config_with, runlocal

TITLE = "Demo: decorrelated BN, TinyResNet, digits (1 grey channel, 8x8)"
WORKDIR = "runs/demo"
METHODS = (
    "bn", "svd", "svd+nog", "svd+olr", "svd+ow", "svd+nog+ow+olr", "newton_schulz",
)
QUICK_METHODS = ("bn", "svd+nog+olr")  # --quick: the reduced mode of the test suite
SEEDS = (0, 1, 2, 3)
FOLDS = 5
DEMO_WALL_NOTE = (
    "about 9 min: 8 min 54 s elapsed (/usr/bin/time) for the 7 methods x 4 seeds x 5 folds "
    "(140 runs of 220 steps) from a clean clone with an empty compilation cache, on the "
    "2-core development machine (Intel Xeon, AVX-512, quiet), 2026-12-07; of it 43 s "
    "compiling and 379 s training (the runs' own clocks); 9 min 17 s with "
    "XLA_FLAGS=--xla_cpu_max_isa=AVX2"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Digits demo; `arg="runlocal"` gives the reduced (test-suite) run."""
    config = config_with(
        dataset="digits",
        image_size=8,
        input_channels=1,
        model="TinyResNet",
        num_filters=16,
        task="dbn",
        method="svd",
        num_epochs=20,
        batch_size=128,
        eval_batch_size=512,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        lr_boundaries_epochs=(10, 15),
        lr_decay=0.1,
        dbn_eps=1e-2,
        cv_folds=FOLDS,
        monitor_every_steps=10,
        log_every_steps=10,
        eval_every_epochs=5,
        checkpoint_every_epochs=20,  # one checkpoint, at the end of a run of seconds
        progress_bar=True,
    )
    if arg == "runlocal":  # 2 folds: the k-fold path, at a fraction of the cost
        runlocal(config, num_train_steps=6, batch_size=32, max_train_examples=256,
                 max_eval_examples=128, eval_batch_size=128, progress_bar=True, cv_folds=2)
    return config
