"""Input pipelines: digits (embedded), TFDS mocks for CIFAR/ImageNet, and the offline check."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from svdcond_jax.training import input_pipeline as ip
from svdcond_jax.training.config import get_config


def _config(**overrides):
    config = get_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def digits():
    return ip.load_data(_config())


def test_digits_split_is_deterministic_and_disjoint():
    tr_x, tr_y, va_x, va_y = ip.digits_arrays()
    assert tr_x.shape == (1497, 8, 8, 1) and va_x.shape == (300, 8, 8, 1)
    assert tr_x.dtype == np.uint8 and tr_x.max() == 255
    assert set(np.unique(tr_y)) == set(range(10)) == set(np.unique(va_y))
    tr2 = ip.digits_arrays()[0]
    np.testing.assert_array_equal(tr_x, tr2)
    train_rows = {row.tobytes() for row in tr_x}
    # Some digit images are exact duplicates in the source; nearly all val ones are new.
    assert sum(row.tobytes() in train_rows for row in va_x) < 10


def test_digits_train_batches_shapes_values(digits):
    assert digits.num_classes == 10 and digits.image_size == 16
    assert digits.train.num_examples == 1497 and digits.eval.num_examples == 300
    batches = list(ip.train_batches(digits, batch_size=100, seed=0, epoch=0))
    assert len(batches) == 14  # drop_remainder
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (1400, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images[..., 0], images[..., 1])  # gray repeated
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert abs(images.mean()) < 0.25 and 0.6 < images.std() < 1.4  # train mean/std normalised
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.dtype == np.int32 and labels.min() == 0 and labels.max() == 9


def test_digits_order_depends_only_on_seed_epoch_and_resumes(digits):
    full = list(ip.train_batches(digits, batch_size=64, seed=3, epoch=2))
    again = list(ip.train_batches(digits, batch_size=64, seed=3, epoch=2, start_batch=5))
    assert len(again) == len(full) - 5
    for a, b in zip(full[5:], again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = next(ip.train_batches(digits, batch_size=64, seed=3, epoch=3))
    assert not np.array_equal(other["label"], full[0]["label"])


def test_digits_eval_covers_split_once_with_mask(digits):
    batches = list(ip.eval_batches(digits, batch_size=128))
    assert [b["image"].shape[0] for b in batches] == [128, 128, 128]
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 300 and np.all(mask[:300] == 1) and np.all(mask[300:] == 0)
    labels = np.concatenate([b["label"] for b in batches])[:300]
    np.testing.assert_array_equal(labels, ip.digits_arrays()[3])


def test_max_examples_subsets():
    data = ip.load_data(_config(max_train_examples=200, max_eval_examples=50))
    assert data.train.num_examples == 200 and data.eval.num_examples == 50


@pytest.mark.parametrize("name,size,classes", [("cifar100", 32, 100), ("cifar10", 32, 10),
                                               ("imagenet2012", 24, 1000)])
def test_tfds_mock_pipelines(name, size, classes):
    config = _config(dataset=name, image_size=size if name == "imagenet2012" else -1)
    with tfds.testing.mock_data(num_examples=12):
        data = ip.load_data(config)
        assert data.num_classes == classes and data.image_size == size
        assert data.train.num_examples == 12
        batch = next(ip.train_batches(data, batch_size=4, seed=0, epoch=0))
        evals = list(ip.eval_batches(data, batch_size=8))
    assert batch["image"].shape == (4, size, size, 3) and batch["image"].dtype == np.float32
    assert np.all(np.isfinite(batch["image"])) and batch["image"].std() > 0.1
    assert batch["label"].min() >= 0 and batch["label"].max() < classes
    assert [e["image"].shape for e in evals] == [(8, size, size, 3)] * 2
    assert sum(e["mask"].sum() for e in evals) == 12


def test_unprepared_dataset_exits_at_once_without_downloading(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise RuntimeError("download_and_prepare must never be called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    for name in ("cifar100", "imagenet2012"):
        with pytest.raises(SystemExit) as info:
            ip.load_data(_config(dataset=name, data_dir=str(tmp_path)))
        assert isinstance(info.value, ip.DatasetNotPreparedError)
        message = str(info.value)
        assert name in message and str(tmp_path) in message and "--config.data_dir" in message
    assert "downloads/manual" in message  # imagenet: manual download instructions


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset"):
        ip.load_data(_config(dataset="mnist"))
