"""Input pipelines: digits (embedded), CIFAR archives (NumPy), TFDS mocks for
CIFAR/ImageNet, and the offline check."""

import io
import pickle
import tarfile

import numpy as np
import pytest

from svdcond_jax.training import input_pipeline as ip
from svdcond_jax.training.config import get_config

tfds = pytest.importorskip("tensorflow_datasets")


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


def test_digits_k_folds_partition_every_image_once():
    n = len(ip.digits_all()[1])
    seen = []
    for fold in range(5):
        tr_x, tr_y, va_x, va_y = ip.digits_arrays(5, fold)
        assert len(tr_y) + len(va_y) == n and abs(len(va_y) - n / 5) < 1
        seen.append(va_y)
    all_x, all_y = ip.digits_all()
    np.testing.assert_array_equal(np.concatenate(seen), all_y)  # the folds in order
    data = ip.load_data(_config(cv_folds=5, cv_fold=4))
    assert data.eval.num_examples == len(seen[4]) and data.train.num_examples == n - len(seen[4])
    with pytest.raises(ValueError, match="cv_folds"):
        ip.digits_arrays(1, 0)


def test_bilinear_resize_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    for size in (16, 12, 8, 5):
        want = tf.image.resize(images.astype(np.float32), (size, size), method="bilinear")
        want = np.clip(np.round(want.numpy()), 0, 255).astype(np.uint8)
        got = ip.resize_bilinear(images, size)
        assert got.shape == (3, size, size, 1)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # rounding at .5


def test_random_crop_flip_equals_the_per_image_definition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    offsets, flips = rng.integers(0, 5, (6, 2)), rng.random(6) < 0.5
    got = ip._random_crop_flip(x, 2, offsets, flips)
    for i in range(6):
        padded = np.pad(x[i], ((2, 2), (2, 2), (0, 0)))
        want = padded[offsets[i, 0]:offsets[i, 0] + 8, offsets[i, 1]:offsets[i, 1] + 8]
        np.testing.assert_array_equal(got[i], want[:, ::-1] if flips[i] else want)


def _write_fake_cifar(directory, name, per_member=6, packed=True):
    """A CIFAR archive in the original format (pickled dicts of CHW rows) with random data."""
    packed_name, folder, train_members, test_member, label_key = ip.CIFAR_ARCHIVES[name]
    rng = np.random.default_rng(0)
    classes = ip.NUM_CLASSES[name]
    members = {}
    for member in (*train_members, test_member):
        data = rng.integers(0, 256, (per_member, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, classes, per_member).tolist()
        members[member] = pickle.dumps({b"data": data, label_key.encode(): labels})
    if packed:
        with tarfile.open(directory / packed_name, "w:gz") as tar:
            for member, payload in members.items():
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (directory / folder).mkdir()
        for member, payload in members.items():
            (directory / folder / member).write_bytes(payload)
    return members


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_reads_without_tfds(tmp_path, name):
    packed_dir, folder_dir = tmp_path / "packed", tmp_path / "folder"
    packed_dir.mkdir(), folder_dir.mkdir()
    members = _write_fake_cifar(packed_dir, name)
    _write_fake_cifar(folder_dir, name, packed=False)
    n_train = 6 * len(ip.CIFAR_ARCHIVES[name][2])
    for directory in (packed_dir, folder_dir):
        for source in ("auto", "archive"):
            config = _config(dataset=name, data_dir=str(directory), data_source=source)
            assert not ip.uses_tfds(config)
            data = ip.load_data(config)
            assert data.train.ds is None and data.train.num_examples == n_train
            assert data.eval.num_examples == 6 and data.num_classes == ip.NUM_CLASSES[name]
    test = pickle.loads(members[ip.CIFAR_ARCHIVES[name][3]])
    first = test[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW rows -> HWC
    np.testing.assert_array_equal(data.eval.images[0], first)
    assert data.eval.labels.tolist() == list(test[ip.CIFAR_ARCHIVES[name][4].encode()])
    batches = list(ip.train_batches(data, batch_size=4, seed=0, epoch=0))
    again = list(ip.train_batches(data, batch_size=4, seed=0, epoch=0))
    assert len(batches) == n_train // 4
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert batches[0]["image"].shape == (4, 32, 32, 3)
    evals = list(ip.eval_batches(data, batch_size=4))
    mean, std = np.array(ip.CIFAR_MEAN), np.array(ip.CIFAR_STD)
    np.testing.assert_allclose(evals[0]["image"][0], (first / 255.0 - mean) / std, atol=1e-5)
    assert [float(e["mask"].sum()) for e in evals] == [4, 2]


def test_cifar_archive_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(SystemExit) as info:
        ip.load_data(_config(dataset="cifar10", data_dir=str(tmp_path),
                             data_source="archive"))
    assert "cifar-10-python.tar.gz" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="TFDS only"):
        ip.load_data(_config(dataset="imagenet2012", data_source="archive"))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset"):
        ip.load_data(_config(dataset="mnist"))
