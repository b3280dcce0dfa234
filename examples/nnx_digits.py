"""Train a small Flax NNX network with decorrelated BN and NOG + OLR on the digits (offline).

The network: a 3x3 stem convolution (the Pre-SVD layer) on scikit-learn's 8x8 grey
handwritten digits (shipped with scikit-learn: no download), ZCA whitening of its output
through the SVD meta-layer (``svdcond_jax.nnx.DecorrelatedBatchNorm``), two plain
conv + BatchNorm blocks, global average pooling and a linear classifier. The optimizer is
``svdcond_jax.pre_svd_sgd`` under ``nnx.Optimizer``: SGD with momentum and weight decay on
every parameter, the Nearest Orthogonal Gradient (Eqs. 14-17) and the Optimal Learning Rate
(Eqs. 18-21) on the stem kernel, selected by the same regex a Linen user writes. Every
``--log_every`` steps it prints the training loss, OLR's eta and the float64 condition
number of the covariance the whitening layer decomposes (kappa(P + eps I), Eq. 1); at the
end, the validation error.

Run (needs the ``experiments`` extra for scikit-learn):

    python examples/nnx_digits.py                 # 300 steps, about a minute on 2 CPU cores
    python examples/nnx_digits.py --steps 40      # what the test suite runs
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import svdcond_jax as sc
from svdcond_jax import nnx as snnx

EPS = 1e-2  # eps I of the whitening layer (the paper's decorrelated-BN value)


class DigitsNet(nnx.Module):
    """Stem conv (Pre-SVD) -> ZCA whitening -> 2 conv blocks -> average pool -> linear."""

    def __init__(self, *, width: int = 16, num_classes: int = 10, rngs: nnx.Rngs) -> None:
        self.stem_conv = nnx.Conv(1, width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_norm = snnx.DecorrelatedBatchNorm(width, epsilon=EPS, rngs=rngs)
        self.conv1 = nnx.Conv(width, 2 * width, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.norm1 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.conv2 = nnx.Conv(2 * width, 2 * width, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.fc = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (B, classes) of grey images (B, 8, 8, 1)."""
        x = nnx.relu(self.stem_norm(self.stem_conv(x)))
        x = nnx.relu(self.norm1(self.conv1(x)))
        x = nnx.relu(self.norm2(self.conv2(x)))
        return self.fc(jnp.mean(x, axis=(1, 2)))


def load_digits_split(num_val: int = 300) -> tuple[np.ndarray, ...]:
    """scikit-learn's digits as float32 (N, 8, 8, 1) in [0, 1]; a fixed train/val split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    return images[num_val:], labels[num_val:], images[:num_val], labels[:num_val]


def stem_kappa(model: DigitsNet, images: np.ndarray) -> float:
    """Float64 kappa(P + eps I) of the stem output's channel covariance (what the DBN whitens)."""
    features = np.asarray(model.stem_conv(jnp.asarray(images)), np.float64)
    x = features.reshape(-1, features.shape[-1])
    p = np.cov(x, rowvar=False, bias=True)
    return float(sc.condition_number_f64(p, eps=EPS))


def loss_fn(model: DigitsNet, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: DigitsNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
               ) -> jax.Array:
    """One SGD step; batch statistics update in place."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)  # OLR reads the weights: nnx.Optimizer passes them
    return loss


@nnx.jit
def error_rate(model: DigitsNet, x: jax.Array, y: jax.Array) -> jax.Array:
    """Classification error (%) with the running statistics (call after model.eval())."""
    return 100.0 * jnp.mean(jnp.argmax(model(x), -1) != y)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Trains, prints progress, returns the final numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2 or args.log_every < 1 or not args.lr > 0:
        parser.error("--steps and --log_every must be >= 1, --batch >= 2, --lr > 0")

    train_x, train_y, val_x, val_y = load_digits_split()
    model = DigitsNet(rngs=nnx.Rngs(args.seed))
    # A decaying rate lets the weights settle, so that the running statistics (exponential
    # moving averages of whitening matrices taken at different weights) match the final
    # weights; with a constant rate NOG keeps moving the stem and they do not.
    schedule = optax.cosine_decay_schedule(args.lr, args.steps)
    tx = sc.pre_svd_sgd(schedule, r"^stem_conv/kernel$", momentum=0.9, weight_decay=5e-4,
                        nog=True, olr=True)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    order, pos = rng.permutation(len(train_y)), 0
    first = last = float("nan")
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(train_y)), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        loss = float(train_step(model, optimizer, jnp.asarray(train_x[idx]),
                                jnp.asarray(train_y[idx])))
        first = loss if step == 1 else first
        last = loss
        if step % args.log_every == 0 or step == args.steps:
            eta = float(sc.find_olr_eta(optimizer.opt_state))
            kappa = stem_kappa(model, train_x[:256])
            print(f"step {step:4d}  loss {loss:.3f}  olr eta {eta:.4f}  "
                  f"kappa(P+eps I) {kappa:.2e}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    model.eval()
    err = float(error_rate(model, jnp.asarray(val_x), jnp.asarray(val_y)))
    print(f"validation error {err:.2f}% on {len(val_y)} digits after {args.steps} steps")
    return {"first_loss": first, "last_loss": last, "val_error": err,
            "kappa_eps": stem_kappa(model, train_x[:256])}


if __name__ == "__main__":
    main()
