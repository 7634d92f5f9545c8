"""Differentiable augmentation of what D sees (DiffAugment, Zhao et al. 2020), with ADA's adaptive strength.

    aug = Augment("color,translation,cutout", p=1.0)
    loss_d = d_loss(D, aug(real), aug(fake), ...)     # the same random family on real and fake
    loss_g = g_loss(D, aug(fake), ...)                 # gradients flow through the augmentation to G

D never sees an un-augmented image, so it cannot memorise a small training set, and because every
operation is differentiable G is trained through it and does not learn the augmentations themselves.
Each operation is applied to each image with probability p. With `adaptive`, p follows ADA's overfitting
heuristic (Karras et al. 2020): r_t = E[sign(D(real))] above `target` means D is too sure of the reals, so
p rises; below, it falls, by at most 1 per `speed` images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import parse_policy as parse


def _chosen(x: torch.Tensor, p: float) -> torch.Tensor:
    """1 for the images an operation applies to (probability p), 0 for the rest, shaped (N, 1, 1, 1)."""
    return (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p).to(x.dtype)


def color(x: torch.Tensor, p: float) -> torch.Tensor:
    """Brightness, saturation and contrast jitter, as in DiffAugment (images in [-1, 1])."""
    m = _chosen(x, p)
    n = x.shape[0]
    x = x + m * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = mean + (x - mean) * (1 + m * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2 - 1))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (x - mean) * (1 + m * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5))


def translation(x: torch.Tensor, p: float, ratio: float = 0.125) -> torch.Tensor:
    """Shift by up to ratio x size in x and y, zero padding (a gather, so gradients reach every pixel)."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    m = _chosen(x, p).view(n, 1, 1).long()
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device) * m
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device) * m
    gx, gy = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx[None] + tx + 1, 0, h + 1)
    gy = torch.clamp(gy[None] + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, gx, gy].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, p: float, ratio: float = 0.5) -> torch.Tensor:
    """Zero a random square of ratio x size (set to 0, the middle grey of [-1, 1] images)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cx = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    gx, gy = torch.meshgrid(torch.arange(ch, device=x.device), torch.arange(cw, device=x.device), indexing="ij")
    gx = torch.clamp(gx[None] + cx - ch // 2, 0, h - 1)
    gy = torch.clamp(gy[None] + cy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, device=x.device, dtype=x.dtype)
    mask[torch.arange(n, device=x.device)[:, None, None], gx, gy] = 0
    m = _chosen(x, p)
    return x * (1 - m + m * mask[:, None])


FUNCS = {"color": color, "translation": translation, "cutout": cutout}


class Augment:
    """The augmentation pipeline and its strength p (a plain float, saved with the checkpoint)."""

    def __init__(self, policy: str | tuple[str, ...], p: float = 1.0, *, adaptive: bool = False,
                 target: float = 0.6, speed: int = 100_000):
        self.ops = parse(policy) if isinstance(policy, str) else tuple(policy)
        self.p, self.adaptive, self.target, self.speed = float(p), adaptive, target, speed

    @property
    def on(self) -> bool:
        return bool(self.ops) and (self.adaptive or self.p > 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on or self.p <= 0:
            return x
        for name in self.ops:
            x = FUNCS[name](x, self.p)
        return x

    def adjust(self, r_t: float, images: int) -> None:
        """ADA's step: move p towards keeping r_t at target, by images / speed at most, within [0, 1]."""
        if self.adaptive and self.ops:
            step = images / self.speed
            self.p = min(1.0, max(0.0, self.p + (step if r_t > self.target else -step)))
