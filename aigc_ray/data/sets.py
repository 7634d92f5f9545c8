"""An image set in memory (uint8 tensors), its resize, and the resumable stream of batches a worker trains on."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..seeds import derive


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


def resize(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
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

