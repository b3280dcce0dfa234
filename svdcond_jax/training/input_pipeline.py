"""tf.data input pipelines: CIFAR10/100 and ImageNet via TFDS, and the embedded digits set.

All datasets go through the same pipeline: per-process shard -> (optional) subset ->
per-epoch deterministic shuffle -> stateless augmentation -> batch -> numpy. The data order
and the augmentation are pure functions of ``(config.seed, epoch, index)``, so a run resumed
at step ``s`` sees exactly the batches an uninterrupted run would (``start_batch``).

Datasets (docs/applications.md):
- ``cifar10``/``cifar100``: random crop 32 with 4 zero padding, horizontal flip, normalise
  with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010).
- ``imagenet2012`` (manual download): resize the shorter side to ``image_size * 256 / 224``,
  random crop ``image_size`` (224), flip; evaluation takes the centre crop. ImageNet mean/std.
- ``digits`` (offline default): scikit-learn's ``load_digits``, 1,797 real 8x8 grayscale
  handwritten digits, 10 classes, shipped inside the package (no download). A fixed
  permutation (seed 0) gives 1,497 training and 300 validation images. Pixels are scaled to
  [0, 1], bilinearly upsampled to ``image_size`` (16) and repeated to 3 channels, so the
  stem is a 3 -> C convolution as on CIFAR (and its output covariance has the same
  rank <= 27 deficiency, docs/conditioning.md). Augmentation is a random crop with
  ``image_size // 8`` zero padding and NO horizontal flip (a flip changes a digit's
  identity). Normalisation uses the training split's mean and std.

Before anything could download, TFDS datasets are opened with ``download=False``; if the
data is missing the process exits at once (:class:`DatasetNotPreparedError`, a SystemExit)
with a message saying what to download and where. This also works under
``tfds.testing.mock_data`` (the mock replaces the reading, so nothing is checked on disk).

Multi-process (docs/distributed.md): every process yields ``batch_size`` examples per step
(its rows of the global batch of ``batch_size * process_count``); the loop assembles the
global array with ``jax.make_array_from_process_local_data``.

- In-memory data (``digits``): every process holds the whole split and runs the one-process
  pipeline over the global batch, keeping only its rows ``[p * B, (p + 1) * B)`` of each
  global batch (before augmentation, so nothing is computed twice). N processes x M devices
  therefore see exactly the global batches of one process with N * M devices.
- TFDS datasets: each process reads only its own files, ``tfds.split_for_jax_process(split)``,
  and shuffles its share: the global batches then depend on the process count (the same
  examples per epoch, in another order). An epoch has as many steps as the smallest share
  fills (the processes must agree), and evaluation pads the smaller shares with empty
  batches, so every example is evaluated exactly once.

Example:
    >>> from svdcond_jax.training.config import get_config
    >>> from svdcond_jax.training import input_pipeline
    >>> data = input_pipeline.load_data(get_config())
    >>> batch = next(input_pipeline.train_batches(data, batch_size=8, seed=0, epoch=0))
    >>> batch["image"].shape, batch["label"].shape
    ((8, 16, 16, 3), (8,))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagenet2012")
_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
_DEFAULT_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagenet2012": 224}
_EVAL_SPLIT = {"digits": "validation", "cifar10": "test", "cifar100": "test",
               "imagenet2012": "validation"}
_DIGITS_NUM_VAL = 300


class DatasetNotPreparedError(SystemExit):
    """Raised (exits the program) when a TFDS dataset is not on disk; never downloads."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of one dataset, ready for batching (multi-process: see ``global_rows``)."""

    name: str  # dataset name
    train: bool
    ds: Any  # tf.data.Dataset of {"image": uint8 (H, W, C), "label": int32}
    num_examples: int  # examples in ``ds``
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Multi-process layout: ``global_rows`` means ``ds`` holds the whole split and each
    # process keeps its rows of every global batch (in-memory data); otherwise ``ds`` is this
    # process's share of the files, and the shares hold ``min_share..max_share`` examples.
    global_rows: bool = True
    min_share: int = -1  # -1: num_examples
    max_share: int = -1

    def train_steps(self, batch_size: int) -> int:
        """Full global batches per epoch, for a per-process ``batch_size``.

        The same on every process (they must run the same number of compiled steps).
        """
        if self.global_rows:
            return self.num_examples // (batch_size * jax.process_count())
        return (self.min_share if self.min_share >= 0 else self.num_examples) // batch_size

    def eval_batches(self, batch_size: int) -> int:
        """Padded evaluation batches that cover the split, for a per-process ``batch_size``."""
        if self.global_rows:
            return -(-self.num_examples // (batch_size * jax.process_count()))
        return -(-(self.max_share if self.max_share >= 0 else self.num_examples) // batch_size)


@dataclasses.dataclass(frozen=True)
class Data:
    """Train and eval splits plus the dataset facts the model needs."""

    train: Split
    eval: Split
    num_classes: int
    image_size: int


def not_prepared_message(name: str, data_dir: str | None) -> str:
    """The message printed when ``name`` is missing under ``data_dir``."""
    where = data_dir or "~/tensorflow_datasets (the TFDS default)"
    msg = (
        f"Dataset {name!r} is not prepared in data_dir={where}, and this program never "
        f"downloads (no internet here). On a machine with internet run\n"
        f"    tfds build {name} --data_dir=DIR\n"
        f"copy DIR here and pass --config.data_dir=DIR (the --data_dir of the experiment "
        f"scripts)."
    )
    if name == "imagenet2012":
        msg += (
            "\nImageNet is a manual download: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar (from image-net.org) into DIR/downloads/manual, then run "
            "`tfds build imagenet2012 --data_dir=DIR` once."
        )
    msg += "\nThe embedded offline dataset needs nothing: --config.dataset=digits."
    return msg


def _load_tfds(name: str, split: str, data_dir: str | None) -> tf.data.Dataset:
    """Opens a prepared TFDS split without ever downloading; exits at once if missing."""
    try:
        return tfds.load(name, split=tfds.split_for_jax_process(split), data_dir=data_dir,
                         download=False, shuffle_files=False)
    except (AssertionError, FileNotFoundError, tfds.core.DatasetNotFoundError) as e:
        raise DatasetNotPreparedError(not_prepared_message(name, data_dir)) from e


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as uint8 (N, 8, 8, 1) images and int32 labels.

    Returns:
        (train_images, train_labels, val_images, val_labels) after a fixed permutation
        (seed 0): 1,497 training and 300 validation examples. Pixels 0..16 map to 0..255.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_val = _DIGITS_NUM_VAL
    return images[n_val:], labels[n_val:], images[:n_val], labels[:n_val]


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality().numpy())
    if n >= 0:
        return n
    return int(ds.reduce(0, lambda c, _: c + 1).numpy())


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.astype(np.float64) / 255.0
    return (float(x.mean()),) * 3, (float(x.std()),) * 3


def _make_split(config: Any, train: bool) -> Split:
    name = config.dataset
    image_size = int(config.image_size) if config.image_size > 0 else _DEFAULT_SIZE[name]
    limit = int(config.max_train_examples if train else config.max_eval_examples)
    if name == "digits":
        tr_x, tr_y, va_x, va_y = digits_arrays()
        mean, std = _channel_stats(tr_x)
        x, y = (tr_x, tr_y) if train else (va_x, va_y)
        if limit > 0:
            x, y = x[:limit], y[:limit]
        ds = tf.data.Dataset.from_tensor_slices({"image": x, "label": y})
        return Split(name, train, ds, len(y), image_size, mean, std, global_rows=True)
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    ds = _load_tfds(name, "train" if train else _EVAL_SPLIT[name], config.data_dir)
    ds = ds.map(lambda e: {"image": e["image"], "label": tf.cast(e["label"], tf.int32)})
    if limit > 0:
        ds = ds.take(max(1, limit // jax.process_count()))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet2012" else (CIFAR_MEAN,
                                                                               CIFAR_STD)
    if name != "imagenet2012":
        ds = ds.cache()
    count = _count(ds)
    low, high = _share_range(count)
    return Split(name, train, ds, count, image_size, mean, std, global_rows=False,
                 min_share=low, max_share=high)


def _share_range(count: int) -> tuple[int, int]:
    """(smallest, largest) per-process example count; a collective with several processes."""
    if jax.process_count() == 1:
        return count, count
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.int32(count)))
    return int(counts.min()), int(counts.max())


def load_data(config: Any) -> Data:
    """Opens the train and eval splits named by ``config.dataset`` (this process's share).

    Args:
        config: reads dataset, data_dir, image_size, max_train_examples, max_eval_examples.

    Returns:
        A :class:`Data`.

    Raises:
        DatasetNotPreparedError: a TFDS dataset is not on disk (exits; never downloads).
        ValueError: unknown dataset name.
    """
    if config.dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {config.dataset!r}; valid: {', '.join(DATASETS)}")
    train, ev = _make_split(config, True), _make_split(config, False)
    return Data(train, ev, _NUM_CLASSES[config.dataset], train.image_size)


def _normalise(image: tf.Tensor, split: Split) -> tf.Tensor:
    image = tf.cast(image, tf.float32) / 255.0
    if image.shape[-1] == 1:
        image = tf.repeat(image, 3, axis=-1)
    return (image - tf.constant(split.mean)) / tf.constant(split.std)


def _resize_shorter(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    return tf.image.resize(image, new, method="bilinear", antialias=True)


def _preprocess(example: dict, seed: tf.Tensor, split: Split) -> dict:
    """Augments (train) or centre-crops (eval) one example; pure in ``seed``."""
    size = split.image_size
    image = example["image"]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    if split.name == "imagenet2012":
        image = _resize_shorter(tf.cast(image, tf.float32), round(size * 256 / 224))
        if split.train:
            image = tf.image.stateless_random_crop(image, (size, size, 3), seed=seeds[0])
        else:
            image = tf.image.resize_with_crop_or_pad(image, size, size)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    elif split.name == "digits":
        image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image = _normalise(image, split)
    if split.train and split.name != "imagenet2012":
        pad = size // 8
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])  # zeros after normalising
        image = tf.image.stateless_random_crop(image, (size, size, 3), seed=seeds[0])
        if split.name != "digits":
            image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    return {"image": image, "label": example["label"]}


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] % (2**31 - 1))


def train_batches(data: Data, *, batch_size: int, seed: int, epoch: int,
                  start_batch: int = 0, shuffle_buffer: int = 16_384
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of augmented training batches (this process's rows of each).

    The order and the augmentation depend only on ``(seed, epoch)`` (and each example's
    position), so ``start_batch=k`` continues exactly where an interrupted epoch stopped.
    For in-memory data the global batches do not depend on the process count (see the
    module docstring). CIFAR uses padding 4 = 32 // 8 (docs/applications.md); ImageNet skips
    the padding crop (it random-crops after resizing instead).

    Args:
        data: from :func:`load_data`.
        batch_size: per-process batch size (drop_remainder); the global batch is
            ``batch_size * jax.process_count()``.
        seed: config.seed.
        epoch: epoch index (0-based).
        start_batch: number of batches of this epoch to skip (resume).
        shuffle_buffer: tf.data shuffle buffer (capped at the split size; the whole split
            for CIFAR and digits, so the shuffle is uniform).

    Yields:
        ``{"image": float32 (B, S, S, 3), "label": int32 (B,)}``, ``Split.train_steps(B)``
        of them (fewer after ``start_batch``).
    """
    split = data.train
    es = _epoch_seed(seed, epoch)
    ds = split.ds.shuffle(max(1, min(split.num_examples, shuffle_buffer)), seed=es,
                          reshuffle_each_iteration=False).enumerate()
    steps = split.train_steps(batch_size)
    if split.global_rows and jax.process_count() > 1:
        # Keep this process's rows of each full global batch; the index i (the seed of the
        # augmentation) stays the global position, as in one process.
        rows, p = batch_size * jax.process_count(), jax.process_index()
        ds = ds.take(steps * rows).filter(
            lambda i, ex: (i % rows) // batch_size == p)
    ds = ds.map(
        lambda i, ex: _preprocess(ex, tf.stack([tf.constant(es, tf.int64), i]), split),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).take(steps).skip(start_batch).prefetch(2)
    yield from tfds.as_numpy(ds)


def eval_batches(data: Data, *, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yields the whole eval split in padded batches with a 0/1 ``mask`` (this process).

    Every process yields the same number of batches, ``Split.eval_batches(batch_size)``
    (empty, all-mask-0 batches pad a smaller share); together they hold every example once.

    Args:
        data: from :func:`load_data`.
        batch_size: per-process batch size; the last batches are zero-padded.

    Yields:
        ``{"image": (B, S, S, 3), "label": (B,), "mask": float32 (B,)}``.
    """
    split = data.eval
    zero = tf.zeros((2,), tf.int64)
    ds = split.ds.map(lambda ex: _preprocess(ex, zero, split),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    n, p = jax.process_count(), jax.process_index()
    rows = batch_size * n if split.global_rows else batch_size
    count = 0
    for batch in tfds.as_numpy(ds.batch(rows).prefetch(2)):
        batch = pad_batch(batch, rows)
        if split.global_rows and n > 1:
            batch = {k: v[p * batch_size:(p + 1) * batch_size] for k, v in batch.items()}
        count += 1
        yield batch
    shape = ds.element_spec["image"].shape
    shape = (tuple(shape) if shape.is_fully_defined()
             else (split.image_size, split.image_size, 3))
    empty = {"image": np.zeros((batch_size, *shape), np.float32),
             "label": np.zeros((batch_size,), np.int32),
             "mask": np.zeros((batch_size,), np.float32)}
    for _ in range(count, split.eval_batches(batch_size)):
        yield empty


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Zero-pads a batch to ``batch_size`` and adds a float ``mask`` of real examples."""
    n = len(batch["label"])
    out = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
           for k, v in batch.items()}
    out["mask"] = (np.arange(batch_size) < n).astype(np.float32)
    return out
