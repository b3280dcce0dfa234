"""The plain-Flax baseline: the smallest CIFAR ResNet-50 train step, no project code.

Written from the Flax examples (``examples/imagenet/models.py`` and ``train.py``,
https://github.com/google/flax/tree/main/examples/imagenet) with only the CIFAR changes of
the paper's network: a 3x3/1 stem conv and no max pool. BatchNorm everywhere, global
average pooling, SGD with momentum 0.9 and coupled weight decay 5e-4 (torch.optim.SGD), one
``jax.jit`` with the train state donated, no non-finite check. It has the same
23,705,252 parameters as ``svdcond_jax.models.CifarResNet50(num_classes=100)``, so its step
separates what XLA:CPU costs from what the project adds (``benchmarks/step_vs_torch.py``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> model = ResNet(num_classes=10, stage_sizes=(1, 1), num_filters=8)
    >>> step, state, batch = build(model, batch=2, image_size=8, num_classes=10)
    >>> state, loss = step(state, batch)
    >>> bool(jnp.isfinite(loss))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


class Bottleneck(nn.Module):
    """Bottleneck block of the Flax ImageNet example (torchvision v1.5 strides)."""

    filters: int
    conv: Any
    norm: Any
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to NHWC ``x``."""
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.norm(scale_init=nn.initializers.zeros_init())(
            self.conv(self.filters * 4, (1, 1))(y))
        if residual.shape != y.shape:
            residual = self.norm(name="norm_proj")(
                self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual))
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3/1 stem conv + BN + ReLU, bottleneck stages, average pool, dense."""

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    num_filters: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits of NHWC images ``x``."""
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, dtype=self.dtype)
        x = conv(self.num_filters, (3, 3), padding=[(1, 1), (1, 1)], name="stem_conv")(x)
        x = nn.relu(norm(name="stem_norm")(x))
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = Bottleneck(self.num_filters * 2**i, conv, norm, strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class TrainState(train_state.TrainState):
    """flax TrainState plus the BatchNorm statistics."""

    batch_stats: Any


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, jax.Array]:
    """Cross entropy, its gradient and one SGD update (the Flax example's step, minus metrics)."""

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         batch["image"], train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats), loss


def build(model: nn.Module, *, batch: int, image_size: int, num_classes: int, seed: int = 0,
          learning_rate: float = 0.1) -> tuple[Callable, TrainState, dict[str, jax.Array]]:
    """The jitted step (state donated), an initial state and a fixed random batch.

    Args:
      model: a Flax module ``model(x, train=...)`` with batch statistics.
      batch: batch size.
      image_size: square image side (3 channels).
      num_classes: label range.
      seed: parameter and data seed.
      learning_rate: SGD learning rate.

    Returns:
      ``(step, state, batch)``; ``step(state, batch) -> (state, loss)``.
    """
    shape = (batch, image_size, image_size, 3)
    variables = jax.jit(partial(model.init, train=False))(
        jax.random.key(seed, impl="rbg"), jnp.zeros(shape, jnp.float32))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(learning_rate, momentum=0.9))
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                              batch_stats=variables["batch_stats"])
    rng = np.random.default_rng(seed)
    data = {"image": jnp.asarray(rng.normal(size=shape), jnp.float32),
            "label": jnp.asarray(rng.integers(0, num_classes, size=(batch,)), jnp.int32)}
    return jax.jit(train_step, donate_argnums=0), state, data
