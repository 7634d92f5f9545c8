"""DCGAN generator and discriminator whose depth follows the image size (32, 64, 128).

    G, D = build(cfg)                  # cfg: a resolved Config
    x = G(noise(16, cfg.model.latent_dim, seed=0))       # (16, C, S, S) in [-1, 1]

G doubles the resolution from 4x4 with transposed convolutions (BatchNorm + ReLU); D halves it back to
4x4 with strided convolutions (LeakyReLU, BatchNorm / LayerNorm / none, optional spectral norm) and a
linear head. Conditional models embed the label into G's input and add a projection term to D
(Miyato & Koyama 2018), so G can be asked for "a sneaker".
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .config import Config


def _ups(image_size: int) -> int:
    return int(math.log2(image_size)) - 2  # 32 -> 3 doublings from 4x4


class Generator(nn.Module):
    def __init__(self, *, image_size: int, channels: int, latent_dim: int, ngf: int, num_classes: int = 0):
        super().__init__()
        n = _ups(image_size)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        c = ngf * 2 ** (n - 1)
        in_dim = latent_dim * (2 if num_classes else 1)
        layers = [  # z -> (ngf * 2^(n-1)) x 4 x 4
            nn.ConvTranspose2d(in_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(n - 1):  # c x s x s -> c/2 x 2s x 2s
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]  # ngf x S/2 -> channels x S x S
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("this generator is class-conditional: pass labels y")
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, *, image_size: int, channels: int, ndf: int, norm: str = "batch",
                 spectral: bool = False, num_classes: int = 0):
        super().__init__()
        n = _ups(image_size)
        sn = spectral_norm if spectral else (lambda m: m)
        layers = [sn(nn.Conv2d(channels, ndf, 4, 2, 1)), nn.LeakyReLU(0.2, True)]  # ndf x S/2 x S/2
        c = ndf
        for _ in range(n - 1):  # c x s x s -> 2c x s/2 x s/2
            layers += [sn(nn.Conv2d(c, 2 * c, 4, 2, 1, bias=norm == "none")), _norm(norm, 2 * c),
                       nn.LeakyReLU(0.2, True)]
            c *= 2
        self.net = nn.Sequential(*layers)  # -> (ndf * 2^(n-1)) x 4 x 4
        self.head = sn(nn.Linear(c * 16, 1))
        self.embed = sn(nn.Embedding(num_classes, c * 16)) if num_classes else None
        self.apply(_init)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.net(x).flatten(1)
        out = self.head(h).squeeze(1)  # (B,) raw scores / critic values
        if self.embed is not None:
            if y is None:
                raise ValueError("this discriminator is class-conditional: pass labels y")
            out = out + (self.embed(y) * h).sum(1)  # projection term <embed(y), h>
        return out


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "layer":
        return nn.GroupNorm(1, c)  # LayerNorm over (C, H, W), per sample: safe with the gradient penalty
    return nn.Identity()


def _init(m: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) weights, N(1, 0.02) norm scales."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
        nn.init.normal_(w, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build(cfg: Config) -> tuple[Generator, Discriminator]:
    """G and D for a resolved config (channels, d_norm and num_classes concrete)."""
    d, m = cfg.data, cfg.model
    g = Generator(image_size=d.image_size, channels=d.channels, latent_dim=m.latent_dim, ngf=m.ngf,
                  num_classes=m.num_classes)
    dis = Discriminator(image_size=d.image_size, channels=d.channels, ndf=m.ndf, norm=m.d_norm,
                        spectral=m.spectral_norm, num_classes=m.num_classes)
    return g, dis


def noise(n: int, latent_dim: int, *, seed: int | None = None, generator: torch.Generator | None = None,
          truncation: float | None = None, device="cpu") -> torch.Tensor:
    """Standard normal z; with truncation t, values outside [-t, t] are redrawn (the truncation trick).

    Drawn on the CPU from a seeded generator, so a seed gives the same z on every machine and device.
    """
    if generator is None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
    z = torch.randn(n, latent_dim, generator=generator)
    if truncation is not None:
        for _ in range(100):
            bad = z.abs() > truncation
            if not bad.any():
                break
            z[bad] = torch.randn(int(bad.sum()), generator=generator)
        z.clamp_(-truncation, truncation)
    return z.to(device)


@torch.no_grad()
def generate(g: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
    """G(z) in eval mode, in batches; returns float images in [-1, 1] on z's device."""
    was_training = g.training
    g.eval()
    try:
        return torch.cat([g(zc, None if y is None else y[i:i + batch])
                          for i, zc in zip(range(0, len(z), batch), z.split(batch))])
    finally:
        g.train(was_training)

