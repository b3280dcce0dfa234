r"""The README demo: decorrelated BN on the embedded digits dataset (offline, 2 CPU cores).

scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package, so no
download; 1,497 train / 300 validation) at their native 8x8 resolution, as ONE grey
channel (`input_channels=1`: the pipeline repeats grey to 3 channels for the CIFAR layout,
the model keeps the first). TinyResNet (2 stages, 16-32 channels, CIFAR-style 3x3 stride-1
stem) has its stem BN replaced by decorrelated BN, so the Pre-SVD layer is the stem conv
and its output covariance is what the meta-layer whitens (eps=1e-2). The 3x3 stem sees
9-dimensional patches, so its 16-channel output covariance has rank <= 9 < 16: singular,
like the paper's CIFAR stem (rank <= 27 < 64; docs/conditioning.md), unless the stem is
orthogonal (SOC, "+ow"); its weight gradient (9 x 16) is full rank (with the grey
channel repeated to 3, the 27 x 16 gradient had rank 9 and NOG acted on round-off).
Same recipe shape as the paper's CIFAR one (SGD lr 0.1 momentum 0.9 wd 5e-4, step decay),
scaled down: 20 epochs of 11 steps (batch 128), 3 seeds per method.

Command (the README's main command; prints the table, writes runs/demo/{table.md,
table.json,conditioning.png}):
  python -m experiments.demo
which is the same as
  python -m experiments.run --config=experiments/configs/digits_demo.py
Reduced mode for the test suite: python -m experiments.demo --quick (runs/demo_quick).

Expected run time: see DEMO_WALL_NOTE (measured on the 2-core development machine).

What to look for (not the paper's CIFAR numbers: 1,497 training images, 16-channel stem,
300 validation images, so one image is 0.33 points of error): the "vs svd" column (is a
method's difference to svd larger than the seeds' spread?), the conditioning columns and
`conditioning.png` -- kappa(P + eps*I) of the matrix the decorrelated BN decomposes, the
raw covariance's rank and kappa on its non-zero spectrum -- per method, the SVD-failure
column (svd_autodiff is plain autodiff through eigh), and the Pre-SVD weight-norm growth
under NOG (docs/conditioning.md).
"""

from __future__ import annotations

import ml_collections

from svdcond_jax.training.config import config_with, runlocal

TITLE = "Demo: decorrelated BN, TinyResNet, digits (1 grey channel, 8x8)"
WORKDIR = "runs/demo"
METHODS = (
    "bn", "svd", "svd_autodiff", "svd+nog", "svd+olr", "svd+ow", "svd+nog+ow+olr",
    "newton_schulz",
)
QUICK_METHODS = ("bn", "svd+nog+olr")  # --quick: the reduced mode of the test suite
SEEDS = (0, 1, 2)
DEMO_WALL_NOTE = (
    "about 6.5 min: 379 s elapsed (/usr/bin/time) for the 8 methods x 3 seeds (220 steps "
    "each) on the 2-core development machine with other jobs running (the process got 67% "
    "of the CPU); of it 66 s compiling (5.7-14.1 s for each method's first seed, 0.1-0.4 s "
    "for the other seeds: the steps are compiled once per method) and 236 s training"
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
        monitor_every_steps=10,
        log_every_steps=10,
        eval_every_epochs=5,
        checkpoint_every_epochs=10,
        progress_bar=True,
    )
    if arg == "runlocal":
        runlocal(config, num_train_steps=6, batch_size=32, max_train_examples=256,
                         max_eval_examples=128, eval_batch_size=128, progress_bar=True)
    return config
