import numpy as np
import pytest
import torch
from PIL import Image

from aigc_ray import data
from aigc_ray.config import DataConfig


def test_mnist_5k_is_offline_real_digits_in_range():
    ds = data.load(DataConfig(dataset="mnist-5k", image_size=32))
    assert ds.images.shape == (5000, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and torch.bincount(ds.labels).tolist() == [500] * 10
    x, y = ds.batch(torch.arange(4))
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9


def test_sizes_and_channels_convert():
    ds = data.load(DataConfig(dataset="mnist-5k", image_size=64, channels=3))
    assert ds.images.shape[1:] == (3, 64, 64)


def test_fashion_mnist_full_split():
    train = data.load(DataConfig(dataset="fashion-mnist"), "train")
    test = data.load(DataConfig(dataset="fashion-mnist"), "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape[1:] == (1, 32, 32)


def _write_images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_folder_dataset_recurses_and_center_crops(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_RAY_CACHE", str(tmp_path / "cache"))
    _write_images(tmp_path / "faces" / "a", 3)
    _write_images(tmp_path / "faces" / "b", 2)
    ds = data.load(DataConfig(dataset=f"folder:{tmp_path / 'faces'}", image_size=32))
    assert ds.images.shape == (5, 3, 32, 32)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.num_classes == 2  # a subfolder each: a label each


def test_folder_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_RAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="holds no images"):
        data.load(DataConfig(dataset=f"folder:{tmp_path / 'empty'}"))
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(DataConfig(dataset=f"folder:{tmp_path / 'nope'}"))
    _write_images(tmp_path / "bad", 1)
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match="cannot read image .*broken.jpg"):
        data.load(DataConfig(dataset=f"folder:{tmp_path / 'bad'}"))


def test_shards_are_disjoint_and_equal():
    ds = data.load(DataConfig(dataset="mnist-5k"))
    a, b = ds.shard(0, 3), ds.shard(1, 3)
    assert len(a) == len(b) == 5000 // 3
    assert not torch.equal(a.images[0], b.images[0])


def test_batches_resume_in_the_same_order():
    ds = data.load(DataConfig(dataset="mnist-5k"))
    full = data.Batches(ds, 64, seed=1)
    seq = [full()[0] for _ in range(100)]  # crosses an epoch boundary (78 batches per epoch)
    resumed = data.Batches(ds, 64, seed=1, start=90)
    assert torch.equal(resumed()[0], seq[90])
    with pytest.raises(data.DataError, match="batch_size"):
        data.Batches(ds.shard(0, 1000), 64, seed=0)
