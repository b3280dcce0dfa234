r"""The README demo: decorrelated BN on the embedded digits dataset (offline, 2 CPU cores).

scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside the package, so no
download) go through the same pipeline as CIFAR; TinyResNet (2 stages, 16-32 channels,
CIFAR-style 3x3 stride-1 stem) has its stem BN replaced by decorrelated BN, so the Pre-SVD
layer is the stem conv and its output covariance is what the meta-layer whitens (eps=1e-2).
The grey digits are repeated to 3 channels, so the 3x3 stem sees 9-dimensional patches and
its 16-channel output covariance has rank <= 9 < 16: singular, like the paper's CIFAR stem
(rank <= 27 < 64; docs/conditioning.md), unless the stem is orthogonal (SOC, "+ow").
Same recipe shape as the paper's CIFAR one (SGD lr 0.1 momentum 0.9 wd 5e-4, step decay),
scaled down to minutes.

Command (the README's main command; prints the table, writes runs/demo/{table.md,
table.json,conditioning.png}):
  python -m experiments.demo
which is the same as
  python -m experiments.run --config experiments/configs/digits_demo.py --workdir runs/demo
Reduced mode for the test suite (< 1 min): python -m experiments.demo --quick

Expected run time: about 6 minutes on 2 CPU cores (measured 361 s for the 8 methods, 40
epochs = 440 steps each, with other jobs running on the machine); --quick: 19 s.

What to look for (not the paper's CIFAR numbers: 1,497 training images, 16-channel stem):
the conditioning columns and `conditioning.png` -- kappa(P + eps*I) of the matrix the
decorrelated BN decomposes and the raw kappa(P) -- per method, the SVD-failure column
(svd_autodiff is plain autodiff through eigh), and the Pre-SVD weight-norm growth under
NOG (docs/conditioning.md).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import _common

TITLE = "Demo: decorrelated BN, TinyResNet, digits"
METHODS = (
    "bn", "svd", "svd_autodiff", "svd+nog", "svd+olr", "svd+ow", "svd+nog+ow+olr",
    "newton_schulz",
)
QUICK_METHODS = ("bn", "svd+nog+olr")  # --quick: the reduced mode of the test suite
SEEDS = (0,)
DEMO_WALL_NOTE = (
    "about 6 min: 361 s measured for the 8 methods (40 epochs, 440 steps each) on the 2-core "
    "development machine with other jobs running; --quick: 19 s"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Digits demo; `arg="runlocal"` gives the reduced (test-suite) run."""
    config = _common.base(
        dataset="digits",
        model="TinyResNet",
        num_filters=16,
        task="dbn",
        method="svd",
        num_epochs=40,
        batch_size=128,
        eval_batch_size=512,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        lr_boundaries_epochs=[20, 30],
        lr_decay=0.1,
        dbn_eps=1e-2,
        monitor_every_steps=10,
        log_every_steps=10,
        eval_every_epochs=5,
        checkpoint_every_epochs=10,
        progress_bar=False,
    )
    if arg == "runlocal":
        _common.runlocal(config, num_train_steps=6, batch_size=32, max_train_examples=256,
                         max_eval_examples=128, eval_batch_size=128)
    return config
