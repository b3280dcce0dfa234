"""The TFDS backend of the input pipeline (tf.data): ImageNet, and CIFAR from TFDS files.

Imported by ``input_pipeline`` only when a run asks for a TFDS dataset
(``input_pipeline.uses_tfds``); it needs the ``tfds`` extra (TensorFlow and
TensorFlow Datasets). Without it the import fails with a message naming the install line.
The contract (batches, determinism, multi-process shares) is ``input_pipeline``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from svdcond_jax._extras import require

require(("tensorflow", "tensorflow_datasets"), extra="tfds",
        what="TFDS datasets (ImageNet; CIFAR without its original archive)")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from svdcond_jax.training import input_pipeline as ip  # noqa: E402


def _load(name: str, split: str, data_dir: str | None) -> tf.data.Dataset:
    """Opens a prepared TFDS split without ever downloading; exits at once if missing."""
    try:
        return tfds.load(name, split=tfds.split_for_jax_process(split), data_dir=data_dir,
                         download=False, shuffle_files=False)
    except (AssertionError, FileNotFoundError, tfds.core.DatasetNotFoundError) as e:
        raise ip.DatasetNotPreparedError(ip.not_prepared_message(name, data_dir)) from e


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality().numpy())
    if n >= 0:
        return n
    return int(ds.reduce(0, lambda c, _: c + 1).numpy())


def _share_range(count: int) -> tuple[int, int]:
    """(smallest, largest) per-process example count; a collective with several processes."""
    if jax.process_count() == 1:
        return count, count
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.int32(count)))
    return int(counts.min()), int(counts.max())


def make_split(config: Any, train: bool, image_size: int) -> ip.Split:
    """This process's share of a TFDS split (``tfds.split_for_jax_process``)."""
    name = config.dataset
    ds = _load(name, "train" if train else ip.EVAL_SPLIT[name], config.data_dir)
    ds = ds.map(lambda e: {"image": e["image"], "label": tf.cast(e["label"], tf.int32)})
    limit = int(config.max_train_examples if train else config.max_eval_examples)
    if limit > 0:
        ds = ds.take(max(1, limit // jax.process_count()))
    mean, std = ((ip.IMAGENET_MEAN, ip.IMAGENET_STD) if name == "imagenet2012"
                 else (ip.CIFAR_MEAN, ip.CIFAR_STD))
    if name != "imagenet2012":
        ds = ds.cache()
    count = _count(ds)
    low, high = _share_range(count)
    return ip.Split(name, train, count, image_size, mean, std, ds=ds, global_rows=False,
                    min_share=low, max_share=high)


def _resize_shorter(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    return tf.image.resize(image, new, method="bilinear", antialias=True)


def _preprocess(example: dict, seed: tf.Tensor, split: ip.Split) -> dict:
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
    elif image.shape[0] != size:  # CIFAR at another resolution than its own 32
        image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image = tf.cast(image, tf.float32) / 255.0
    image = (image - tf.constant(split.mean)) / tf.constant(split.std)
    if split.train and split.name != "imagenet2012":
        pad = size // 8
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])  # zeros after normalising
        image = tf.image.stateless_random_crop(image, (size, size, 3), seed=seeds[0])
        image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    return {"image": image, "label": example["label"]}


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] % (2**31 - 1))


def train_batches(split: ip.Split, batch_size: int, seed: int, epoch: int, start_batch: int,
                  shuffle_buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of this process's share, shuffled and augmented (see
    ``input_pipeline.train_batches``)."""
    es = _epoch_seed(seed, epoch)
    ds = split.ds.shuffle(max(1, min(split.num_examples, shuffle_buffer)), seed=es,
                          reshuffle_each_iteration=False).enumerate()
    ds = ds.map(
        lambda i, ex: _preprocess(ex, tf.stack([tf.constant(es, tf.int64), i]), split),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    steps = split.train_steps(batch_size)
    ds = ds.batch(batch_size, drop_remainder=True).take(steps).skip(start_batch).prefetch(2)
    yield from tfds.as_numpy(ds)


def eval_batches(split: ip.Split, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the eval split in (unpadded) batches of ``rows``."""
    zero = tf.zeros((2,), tf.int64)
    ds = split.ds.map(lambda ex: _preprocess(ex, zero, split),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    yield from tfds.as_numpy(ds.batch(rows).prefetch(2))
