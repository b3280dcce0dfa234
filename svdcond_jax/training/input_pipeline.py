"""Input pipelines: in-memory NumPy data (digits, CIFAR archives) and TFDS datasets.

Two backends behind one interface (:func:`load_data`, :func:`train_batches`,
:func:`eval_batches`), chosen per dataset; the training loop does not know which it got:

- **In memory, NumPy only** (no TensorFlow): scikit-learn's embedded ``digits`` (offline)
  and CIFAR10/100 read from the original Python archives (``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html, packed or
  extracted, in ``config.data_dir``). The whole split is a uint8 array; batches are cut,
  normalised and augmented with NumPy.
- **TFDS** (``tfds_pipeline``, the ``tfds`` extra; imports TensorFlow): ``imagenet2012``,
  and CIFAR when ``config.data_source="tfds"`` (or ``"auto"`` finds no archive). TensorFlow is
  imported only then.

Both give the same batches' contract: ``{"image": float32 (B, S, S, 3), "label": int32
(B,)}``; the data order and the augmentation are pure functions of ``(config.seed, epoch,
index)``, so a run resumed at step ``s`` sees exactly the batches an uninterrupted run would
(``start_batch``).

Datasets (docs/applications.md):
- ``cifar10``/``cifar100``: random crop 32 with 4 zero padding, horizontal flip, normalise
  with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010).
- ``imagenet2012`` (TFDS, manual download): resize the shorter side to
  ``image_size * 256 / 224``, random crop ``image_size`` (224), flip; evaluation takes the
  centre crop. ImageNet mean/std.
- ``digits`` (offline default): scikit-learn's ``load_digits``, 1,797 real 8x8 grayscale
  handwritten digits, 10 classes, shipped inside scikit-learn (no download). A fixed
  permutation (seed 0) gives 1,497 training and 300 validation images, or, with
  ``config.cv_folds = k``, fold ``config.cv_fold`` of a k-fold partition of all 1,797 is
  validated and the rest trained on. Pixels are scaled to [0, 1], bilinearly resized to
  ``image_size`` (16 by default) and repeated to 3 channels (``config.input_channels=1``
  makes the model keep one). Augmentation is a random crop with ``image_size // 8`` zero
  padding and NO horizontal flip (a flip changes a digit's identity). Normalisation uses
  the training split's mean and std.

Before anything could download, TFDS datasets are opened with ``download=False``; if the
data is missing the process exits at once (:class:`DatasetNotPreparedError`, a SystemExit)
with a message saying what to download and where. CIFAR archives are never downloaded
either.

Multi-process (docs/distributed.md): every process yields ``batch_size`` examples per step
(its rows of the global batch of ``batch_size * process_count``); the loop assembles the
global array with ``jax.make_array_from_process_local_data``.

- In-memory data: every process holds the whole split and runs the one-process pipeline
  over the global batch, keeping only its rows ``[p * B, (p + 1) * B)`` of each global batch
  (before augmentation, so nothing is computed twice). N processes x M devices therefore
  see exactly the global batches of one process with N * M devices.
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
import io
import os
import pickle
import tarfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagenet2012")
DATA_SOURCES: tuple[str, ...] = ("auto", "archive", "tfds")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
DEFAULT_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagenet2012": 224}
EVAL_SPLIT = {"digits": "validation", "cifar10": "test", "cifar100": "test",
              "imagenet2012": "validation"}
DIGITS_NUM_VAL = 300  # the fixed hold-out when config.cv_folds == 0
# The original CIFAR Python archives: (packed file, extracted folder, train members,
# test member, label key).
CIFAR_ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test",
                 "fine_labels"),
}


class DatasetNotPreparedError(SystemExit):
    """Raised (exits the program) when a dataset is not on disk; never downloads."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of one dataset, ready for batching (multi-process: see ``global_rows``).

    In memory: ``images`` (uint8 (N, S, S, C) at the final size) and ``labels`` (int32);
    TFDS: ``ds`` (a tf.data.Dataset of this process's share).
    """

    name: str  # dataset name
    train: bool
    num_examples: int  # examples in ``images`` / ``ds``
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    ds: Any = None
    # Multi-process layout: ``global_rows`` means the split is whole on every process and
    # each process keeps its rows of every global batch (in-memory data); otherwise ``ds``
    # is this process's share of the files, and the shares hold ``min_share..max_share``.
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
    if name in CIFAR_ARCHIVES:
        packed, folder = CIFAR_ARCHIVES[name][:2]
        msg += (f"\nWithout TensorFlow: put {packed} (or its folder {folder}/) from "
                "https://www.cs.toronto.edu/~kriz/cifar.html into DIR and pass "
                "--config.data_dir=DIR (config.data_source='archive' or 'auto').")
    if name == "imagenet2012":
        msg += (
            "\nImageNet is a manual download: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar (from image-net.org) into DIR/downloads/manual, then run "
            "`tfds build imagenet2012 --data_dir=DIR` once."
        )
    msg += "\nThe embedded offline dataset needs nothing: --config.dataset=digits."
    return msg


# ----------------------------------------------------------------------------- sources


def digits_all() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits, uint8 (N, 8, 8, 1) and int32 labels.

    Returned in a fixed permutation (seed 0); pixels 0..16 map to 0..255.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order], labels[order]


def digits_arrays(cv_folds: int = 0, cv_fold: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits' training and validation arrays.

    Args:
        cv_folds: 0 for the fixed hold-out (the first 300 of :func:`digits_all` validate,
            1,497 train); k >= 2 for k-fold cross-validation: fold ``cv_fold`` is the
            ``cv_fold``-th of k contiguous, near-equal parts of :func:`digits_all`'s order
            (sizes differ by at most 1), so over the k folds every image is validated once.
        cv_fold: which fold validates, in [0, cv_folds).

    Returns:
        (train_images, train_labels, val_images, val_labels).

    Raises:
        ValueError: for cv_folds == 1, < 0 or above the number of images, or a fold index
            out of range.
    """
    images, labels = digits_all()
    n = len(labels)
    if cv_folds == 0:
        val = np.arange(DIGITS_NUM_VAL)
    else:
        if not 2 <= cv_folds <= n or not 0 <= cv_fold < cv_folds:
            raise ValueError(f"cv_folds={cv_folds}, cv_fold={cv_fold}: need 2 <= cv_folds <= "
                             f"{n} and 0 <= cv_fold < cv_folds (or cv_folds=0)")
        bounds = np.linspace(0, n, cv_folds + 1).round().astype(int)
        val = np.arange(bounds[cv_fold], bounds[cv_fold + 1])
    train = np.setdiff1d(np.arange(n), val)
    return images[train], labels[train], images[val], labels[val]


def _cifar_member(name: str, data_dir: str | None) -> Any:
    """A function member -> bytes over the CIFAR archive in ``data_dir``, or None."""
    if not data_dir:
        return None
    packed, folder = CIFAR_ARCHIVES[name][:2]
    if os.path.isdir(os.path.join(data_dir, folder)):
        def read(member: str) -> bytes:
            with open(os.path.join(data_dir, folder, member), "rb") as f:
                return f.read()
        return read
    if os.path.isfile(os.path.join(data_dir, packed)):
        def read_packed(member: str) -> bytes:
            with tarfile.open(os.path.join(data_dir, packed), "r:gz") as tar:
                f = tar.extractfile(f"{folder}/{member}")
                if f is None:
                    raise ValueError(f"{packed} has no file {folder}/{member}")
                return f.read()
        return read_packed
    return None


def has_cifar_archive(name: str, data_dir: str | None) -> bool:
    """Whether ``data_dir`` holds the original Python archive of ``name`` (packed or not)."""
    return name in CIFAR_ARCHIVES and _cifar_member(name, data_dir) is not None


def cifar_arrays(name: str, data_dir: str | None, *, train: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR10/100 from the original Python archive, uint8 (N, 32, 32, 3) and int32 labels.

    Raises:
        DatasetNotPreparedError: no archive in ``data_dir`` (exits; never downloads).
    """
    read = _cifar_member(name, data_dir)
    if read is None:
        raise DatasetNotPreparedError(not_prepared_message(name, data_dir))
    _, _, train_members, test_member, label_key = CIFAR_ARCHIVES[name]
    images, labels = [], []
    for member in (train_members if train else (test_member,)):
        batch = pickle.load(io.BytesIO(read(member)), encoding="bytes")
        images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key.encode()], np.int32))
    return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)


# ----------------------------------------------------------------------------- loading


def uses_tfds(config: Any) -> bool:
    """Whether ``config`` asks for a TFDS dataset (and therefore TensorFlow).

    ``imagenet2012`` always; CIFAR with ``data_source="tfds"``, or ``"auto"`` when
    ``data_dir`` holds no original archive; ``digits`` never.
    """
    name, source = config.dataset, config.get("data_source", "auto")
    if name == "digits":
        return False
    if name == "imagenet2012" or source == "tfds":
        return True
    return source == "auto" and not has_cifar_archive(name, config.data_dir)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resizing with half-pixel centres (no
    antialiasing), as ``tf.image.resize(..., "bilinear")`` and ``jax.image.resize``
    upsample."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    lo = np.clip(np.floor(x).astype(int), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    frac = np.clip(x - np.floor(x), 0.0, 1.0)
    frac = np.where(x < 0, 0.0, frac)
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    return weights


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, C) images bilinearly resized to (N, size, size, C), rounded."""
    h, w = images.shape[1:3]
    if (h, w) == (size, size):
        return images
    rows, cols = _bilinear_matrix(h, size), _bilinear_matrix(w, size)
    out = np.einsum("ih,nhwc,jw->nijc", rows, images.astype(np.float64), cols)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.astype(np.float64) / 255.0
    return (float(x.mean()),) * 3, (float(x.std()),) * 3


def _in_memory_splits(config: Any, image_size: int) -> tuple[Split, Split]:
    name = config.dataset
    if name == "digits":
        tr_x, tr_y, va_x, va_y = digits_arrays(int(config.get("cv_folds", 0)),
                                               int(config.get("cv_fold", 0)))
        mean, std = _channel_stats(tr_x)
    else:
        (tr_x, tr_y), (va_x, va_y) = (cifar_arrays(name, config.data_dir, train=t)
                                      for t in (True, False))
        mean, std = CIFAR_MEAN, CIFAR_STD
    splits = []
    for train, x, y in ((True, tr_x, tr_y), (False, va_x, va_y)):
        limit = int(config.max_train_examples if train else config.max_eval_examples)
        if limit > 0:
            x, y = x[:limit], y[:limit]
        x = resize_bilinear(x, image_size)
        splits.append(Split(name, train, len(y), image_size, mean, std, images=x, labels=y))
    return splits[0], splits[1]


def load_data(config: Any) -> Data:
    """Opens the train and eval splits named by ``config.dataset`` (this process's share).

    Args:
        config: reads dataset, data_source, data_dir, image_size, max_train_examples,
            max_eval_examples (and cv_folds, cv_fold for digits).

    Returns:
        A :class:`Data`.

    Raises:
        DatasetNotPreparedError: the dataset is not on disk (exits; never downloads).
        ImportError: a TFDS dataset without the ``tfds`` extra (the message names the
            ``pip install`` line).
        ValueError: unknown dataset or data source.
    """
    name = config.dataset
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    source = config.get("data_source", "auto")
    if source not in DATA_SOURCES:
        raise ValueError(f"Unknown data_source {source!r}; valid: {', '.join(DATA_SOURCES)}")
    if source == "archive" and name not in CIFAR_ARCHIVES and name != "digits":
        raise ValueError(f"data_source='archive' reads CIFAR's Python archives; {name!r} "
                         "comes from TFDS only (data_source='auto' or 'tfds')")
    image_size = int(config.image_size) if config.image_size > 0 else DEFAULT_SIZE[name]
    if uses_tfds(config):
        from svdcond_jax.training import tfds_pipeline

        train, ev = (tfds_pipeline.make_split(config, t, image_size) for t in (True, False))
    else:
        train, ev = _in_memory_splits(config, image_size)
    return Data(train, ev, NUM_CLASSES[name], image_size)


# ----------------------------------------------------------------------------- batches


def _normalise(images: np.ndarray, split: Split) -> np.ndarray:
    """uint8 (B, S, S, C) -> float32 (B, S, S, 3), grey repeated to 3 channels."""
    x = images.astype(np.float32) / np.float32(255.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return (x - np.asarray(split.mean, np.float32)) / np.asarray(split.std, np.float32)


def _random_crop_flip(x: np.ndarray, pad: int, offsets: np.ndarray, flips: np.ndarray
                      ) -> np.ndarray:
    """Crops each (S, S, C) image of ``x`` at ``offsets`` (B, 2) from its ``pad``-zero-padded
    copy, then mirrors the rows where ``flips`` is True."""
    b, s = x.shape[:2]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, :1] + np.arange(s)  # (B, S)
    cols = offsets[:, 1:] + np.arange(s)
    out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    out[flips] = out[flips, :, ::-1]
    return out


def _epoch_plan(split: Split, seed: int, epoch: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The epoch's example order, crop offsets and flips, by position; pure in
    ``(seed, epoch)``."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    n, pad = split.num_examples, split.image_size // 8
    order = rng.permutation(n)
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = (rng.random(n) < 0.5) & (split.name != "digits")
    return order, offsets, flips


def _in_memory_train(split: Split, batch_size: int, seed: int, epoch: int,
                     start_batch: int) -> Iterator[dict[str, np.ndarray]]:
    order, offsets, flips = _epoch_plan(split, seed, epoch)
    rows = batch_size * jax.process_count()
    first = jax.process_index() * batch_size  # this process's rows of each global batch
    for b in range(start_batch, split.train_steps(batch_size)):
        pos = np.arange(b * rows + first, b * rows + first + batch_size)
        idx = order[pos]
        image = _normalise(split.images[idx], split)
        image = _random_crop_flip(image, split.image_size // 8, offsets[pos], flips[pos])
        yield {"image": image, "label": split.labels[idx]}


def train_batches(data: Data, *, batch_size: int, seed: int, epoch: int,
                  start_batch: int = 0, shuffle_buffer: int = 16_384
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of augmented training batches (this process's rows of each).

    The order and the augmentation depend only on ``(seed, epoch)`` (and each example's
    position), so ``start_batch=k`` continues exactly where an interrupted epoch stopped.
    For in-memory data the global batches do not depend on the process count (see the
    module docstring), and the shuffle is a uniform permutation of the whole split. CIFAR
    uses padding 4 = 32 // 8 (docs/applications.md); ImageNet skips the padding crop (it
    random-crops after resizing instead).

    Args:
        data: from :func:`load_data`.
        batch_size: per-process batch size (drop_remainder); the global batch is
            ``batch_size * jax.process_count()``.
        seed: config.seed.
        epoch: epoch index (0-based).
        start_batch: number of batches of this epoch to skip (resume).
        shuffle_buffer: TFDS only: tf.data's shuffle buffer (capped at the split size).

    Yields:
        ``{"image": float32 (B, S, S, 3), "label": int32 (B,)}``, ``Split.train_steps(B)``
        of them (fewer after ``start_batch``).
    """
    split = data.train
    if split.ds is not None:
        from svdcond_jax.training import tfds_pipeline

        yield from tfds_pipeline.train_batches(split, batch_size, seed, epoch, start_batch,
                                               shuffle_buffer)
    else:
        yield from _in_memory_train(split, batch_size, seed, epoch, start_batch)


def _in_memory_eval(split: Split, rows: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, split.num_examples, rows):
        yield {"image": _normalise(split.images[start:start + rows], split),
               "label": split.labels[start:start + rows]}


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
    n, p = jax.process_count(), jax.process_index()
    rows = batch_size * n if split.global_rows else batch_size
    if split.ds is not None:
        from svdcond_jax.training import tfds_pipeline

        raw = tfds_pipeline.eval_batches(split, rows)
    else:
        raw = _in_memory_eval(split, rows)
    count = 0
    for batch in raw:
        batch = pad_batch(batch, rows)
        if split.global_rows and n > 1:
            batch = {k: v[p * batch_size:(p + 1) * batch_size] for k, v in batch.items()}
        count += 1
        yield batch
    size = split.image_size
    empty = {"image": np.zeros((batch_size, size, size, 3), np.float32),
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
