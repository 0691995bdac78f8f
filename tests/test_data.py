"""Data: IDX and CIFAR readers on files written here, the Parquet cache, batches, augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cmd_ray import data as data_mod
from cmd_ray.batches import augment, epoch_batches, shard
from cmd_ray.data import DataError, load_data, materialise, read_parquet_split
from cmd_ray.datasets.fashion_mnist import read_idx
from cmd_ray.noise import NoiseSpec

from .conftest import needs_fmnist, write_fake_cifar, write_idx


def test_idx_roundtrip_and_truncation(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz=False)
    assert np.array_equal(read_idx(path, 3), array)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"x-idx3-ubyte: truncated IDX data .* delete or reinstall it"):
        read_idx(path, 3)


def test_idx_wrong_kind_is_refused(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="not an IDX file of 3-d unsigned bytes"):
        read_idx(path, 3)


def test_fashion_mnist_cache_holds_clean_and_noisy_labels_and_noise_metadata(fake_fmnist_root):
    spec = NoiseSpec("symmetric", 0.4)
    train_path, test_path = materialise("fashion-mnist", fake_fmnist_root, spec, seed=1)
    table = pq.read_table(train_path)
    assert table.column_names == ["index", "image", "clean_label", "noisy_label"]
    meta = json.loads(table.schema.metadata[b"cmd_ray"])
    assert meta["noise"] == {"type": "symmetric", "rate": 0.4, "matrix": None}
    assert meta["seed"] == 1 and len(meta["realised_matrix"]) == 10
    split = read_parquet_split(train_path)
    assert split.images.shape == (600, 1, 28, 28) and split.images.dtype == torch.uint8
    rate = float((split.noisy_labels != split.clean_labels).float().mean())
    assert rate == pytest.approx(meta["realised_rate"]) and 0.3 < rate < 0.5
    test = read_parquet_split(test_path)
    assert torch.equal(test.noisy_labels, test.clean_labels)


def test_second_load_reads_the_cache_without_raw_files(fake_fmnist_root, monkeypatch):
    spec = NoiseSpec("pairflip", 0.2)
    first = load_data("fashion-mnist", fake_fmnist_root, spec, seed=0)

    def no_raw(*_):
        raise AssertionError("raw files read again")

    monkeypatch.setattr(data_mod, "load_raw", no_raw)
    second = load_data("fashion-mnist", fake_fmnist_root, spec, seed=0)
    assert torch.equal(first.train.noisy_labels, second.train.noisy_labels)
    assert torch.equal(first.train.images, second.train.images)


def test_different_noise_specs_get_different_cache_files(fake_fmnist_root):
    a, _ = materialise("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.2), 0)
    b, _ = materialise("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.4), 0)
    c, _ = materialise("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.2), 1)
    assert len({a, b, c}) == 3


def test_corrupt_cache_file_gives_a_clear_error(fake_fmnist_root):
    train_path, _ = materialise("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.2), 0)
    Path(train_path).write_bytes(Path(train_path).read_bytes()[:200])
    with pytest.raises(DataError, match=r"cache file is corrupt .*delete it and rerun"):
        load_data("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.2), 0)


def test_missing_cache_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: cache file missing"):
        read_parquet_split(tmp_path / "nope.parquet")


def test_missing_raw_data_without_network_gives_a_clear_error(tmp_path, monkeypatch, capfd):
    import urllib.error

    import torchvision

    class Offline:  # torchvision's downloader as it fails on a machine without network
        def __init__(self, root: str, train: bool, download: bool):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("cmd_ray.datasets.fashion_mnist.DEBIAN_FOLDER", tmp_path / "none")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataError) as caught:
        materialise("fashion-mnist", tmp_path, NoiseSpec("none", 0.0), 0)
    message = str(caught.value)
    assert message.startswith(f"data.root: fashion-mnist: not found under {tmp_path} and download failed (")
    assert "Temporary failure in name resolution" in message
    assert message.endswith(
        f"install Debian's dataset-fashion-mnist or put the four IDX files in {tmp_path}/fashion-mnist"
    )
    assert "downloading with torchvision" in capfd.readouterr().err
    assert not list(tmp_path.glob("*.parquet"))  # no cache written


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_reads_cifar_format(tmp_path, name, classes):
    write_fake_cifar(tmp_path, name, n_train=100, n_test=40)
    bundle = load_data(name, tmp_path, NoiseSpec("symmetric", 0.5), seed=0)
    assert bundle.train.images.shape == (100, 3, 32, 32)
    assert bundle.test.images.shape == (40, 3, 32, 32)
    assert int(bundle.train.clean_labels.max()) < classes
    assert bundle.info.num_classes == classes


def test_cifar_image_layout_is_channel_planes(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    import pickle

    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    bundle = load_data("cifar10", tmp_path, NoiseSpec("none", 0.0), seed=0)
    first = bundle.train.images[0]
    assert np.array_equal(first[0].numpy().ravel(), raw[:1024])  # red plane
    assert np.array_equal(first[2].numpy().ravel(), raw[2048:])  # blue plane


def test_cifar_loader_refuses_pickles_holding_code(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR batch .*refusing to load"):
        load_data("cifar10", tmp_path, NoiseSpec("none", 0.0), seed=0)


def test_train_subset_is_seeded_and_test_is_never_subset_by_default(fake_fmnist_root):
    a = load_data("fashion-mnist", fake_fmnist_root, NoiseSpec("none", 0.0), 0, train_subset=100)
    b = load_data("fashion-mnist", fake_fmnist_root, NoiseSpec("none", 0.0), 0, train_subset=100)
    assert len(a.train) == 100 and torch.equal(a.train.index, b.train.index)
    assert len(a.test) == 200


def test_validation_split_is_held_out_of_training_seeded_and_keeps_the_noisy_labels(fake_fmnist_root):
    spec = NoiseSpec("symmetric", 0.4)
    a = load_data("fashion-mnist", fake_fmnist_root, spec, 0, train_subset=500, validation_fraction=0.2)
    b = load_data("fashion-mnist", fake_fmnist_root, spec, 0, train_subset=500, validation_fraction=0.2)
    whole = load_data("fashion-mnist", fake_fmnist_root, spec, 0, train_subset=500)
    assert len(a.train) == 400 and len(a.validation) == 100 and whole.validation is None
    assert not set(a.train.index.tolist()) & set(a.validation.index.tolist())
    assert set(a.train.index.tolist()) | set(a.validation.index.tolist()) == set(whole.train.index.tolist())
    assert torch.equal(a.validation.index, b.validation.index)
    # Held-out rows keep their noisy labels: some differ from the clean ones, as in training.
    assert (a.validation.noisy_labels != a.validation.clean_labels).any()


def test_epoch_batches_cover_every_sample_once_in_a_seeded_order():
    batches = list(epoch_batches(103, 10, seed=5, epoch=2))
    assert len(batches) == 11 and len(batches[-1]) == 3
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    again = list(epoch_batches(103, 10, seed=5, epoch=2))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    other = torch.cat(list(epoch_batches(103, 10, seed=5, epoch=3)))
    assert not torch.equal(torch.cat(batches), other)


def test_replica_shards_partition_the_batch():
    positions = torch.arange(10)
    parts = [shard(positions, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), positions)


def test_augment_is_a_seeded_random_crop_of_the_zero_padded_image_and_a_flip_of_half():
    images = torch.randn(64, 3, 8, 8)
    a = augment(images, torch.Generator().manual_seed(0), padding=2)
    assert a.shape == images.shape and torch.equal(a, augment(images, torch.Generator().manual_seed(0), padding=2))
    # The same draws, in augment's order: each output is the padded image's window at (dy, dx),
    # mirrored where the flip came up.
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (64,), generator=g), torch.randint(0, 5, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(64):
        window = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        assert torch.equal(a[i], window.flip(-1) if flip[i] else window), i
    assert 0 < int(flip.sum()) < 64 and len({(int(y), int(x)) for y, x in zip(dy, dx)}) > 10
    # No padding: the identity or the mirror image, never anything else.
    mirrored = augment(images, torch.Generator().manual_seed(1), padding=0)
    kinds = {torch.equal(m, x) - torch.equal(m, x.flip(-1)) for m, x in zip(mirrored, images)}
    assert kinds == {1, -1}


@needs_fmnist
def test_real_fashion_mnist_has_60000_train_and_10000_test(real_data_root):
    bundle = load_data("fashion-mnist", real_data_root, NoiseSpec("symmetric", 0.4), seed=0, train_subset=10_000)
    assert len(bundle.train) == 10_000 and len(bundle.test) == 10_000
    assert bundle.noise["realised_rate"] == pytest.approx(0.4, abs=0.01)
    assert sorted(torch.unique(bundle.test.clean_labels).tolist()) == list(range(10))


def test_labels_digest_changes_with_any_noisy_label_or_sample_id(fake_fmnist_root):
    from cmd_ray.ray_train import labels_digest

    bundle = load_data("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.4), 0, validation_fraction=0.2)
    before = labels_digest(bundle)
    again = load_data("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.4), 0, validation_fraction=0.2)
    assert labels_digest(again) == before
    bundle.validation.noisy_labels[3] = (bundle.validation.noisy_labels[3] + 1) % 10
    assert labels_digest(bundle) != before


def test_the_subset_rate_is_reported_only_where_training_uses_a_subset(fake_fmnist_root):
    spec = NoiseSpec("symmetric", 0.4)
    whole = load_data("fashion-mnist", fake_fmnist_root, spec, 0)
    assert whole.noise["subset_realised_rate"] is None and whole.noise["realised_rate"] > 0.3
    part = load_data("fashion-mnist", fake_fmnist_root, spec, 0, train_subset=300)
    held = load_data("fashion-mnist", fake_fmnist_root, spec, 0, validation_fraction=0.2)
    for bundle in (part, held):
        rate = bundle.noise["subset_realised_rate"]
        assert rate == float((bundle.train.noisy_labels != bundle.train.clean_labels).float().mean())


def test_augmentation_is_off_for_your_own_data_and_scales_with_the_image_when_asked():
    from cmd_ray.datasets import Augmentation, augmentation

    assert augmentation("image_folder", "auto", 8) is None and augmentation("parquet", "auto", 32) is None
    assert augmentation("fashion-mnist", "auto", 28) is None
    assert augmentation("cifar10", "auto", 32) == Augmentation(4, True)  # the published recipe, unchanged
    assert augmentation("image_folder", "on", 8) == Augmentation(1, False)  # an eighth of the side, no flip
    assert augmentation("image_folder", "on", 64) == Augmentation(8, False)
    assert augmentation("image_folder", "on", 8, flip=True) == Augmentation(1, True)
    assert augmentation("cifar100", "on", 32, flip=False) == Augmentation(4, False)
    assert augmentation("cifar10", "off", 32) is None
    # Without flips the crop draws are the same, and no image is mirrored.
    images = torch.randn(32, 1, 8, 8)
    g = torch.Generator
    crops = augment(images, g().manual_seed(3), padding=1, flip=False)
    both = augment(images, g().manual_seed(3), padding=1, flip=True)
    assert all(torch.equal(c, b) or torch.equal(c.flip(-1), b) for c, b in zip(crops, both))
    assert not torch.equal(crops, both)
