"""DCGAN and ResNet (SNGAN-style) generators and discriminators whose depth follows the image size.

    G, D = build(cfg)                  # cfg: a resolved Config
    x = G(seeds.noise(16, cfg.model.latent_dim, seed=0))       # (16, C, S, S) in [-1, 1]

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

from ..config import Config


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

    def _input(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """z, with the label's embedding beside it in a conditional G."""
        if self.embed is None:
            return z
        if y is None:
            raise ValueError("this generator is class-conditional: pass labels y")
        return torch.cat([z, self.embed(y)], dim=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self._input(z, y)[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, *, image_size: int, channels: int, ndf: int, norm: str = "batch",
                 spectral: bool = False, num_classes: int = 0):
        super().__init__()
        n = _ups(image_size)
        sn = spectral_norm if spectral else (lambda m: m)
        layers = [sn(nn.Conv2d(channels, ndf, 4, 2, 1)), nn.LeakyReLU(0.2)]  # ndf x S/2 x S/2
        c = ndf
        for _ in range(n - 1):  # c x s x s -> 2c x s/2 x s/2
            layers += [sn(nn.Conv2d(c, 2 * c, 4, 2, 1, bias=norm == "none")), _norm(norm, 2 * c),
                       nn.LeakyReLU(0.2)]
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


class _GBlock(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3, plus an upsampled 1x1 shortcut (SNGAN, Miyato et al. 2018)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(True), nn.Upsample(scale_factor=2),
                                  nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(True),
                                  nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class _DBlock(nn.Module):
    """(ReLU)-conv3-norm-ReLU-conv3-avgpool, plus a 1x1 avgpooled shortcut; the first block of D takes the
    image itself, so it starts with the convolution, not a ReLU."""

    def __init__(self, cin: int, cout: int, sn, norm: str, first: bool):
        super().__init__()
        self.body = nn.Sequential(*([] if first else [nn.ReLU()]), sn(nn.Conv2d(cin, cout, 3, 1, 1)),
                                  _norm(norm, cout), nn.ReLU(), sn(nn.Conv2d(cout, cout, 3, 1, 1)), nn.AvgPool2d(2))
        self.skip = nn.Sequential(nn.AvgPool2d(2), sn(nn.Conv2d(cin, cout, 1))) if first else \
            nn.Sequential(sn(nn.Conv2d(cin, cout, 1)), nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class ResNetGenerator(Generator):
    """z -> linear 4x4 -> up-blocks halving the width from ngf x 2^(n-1) to ngf -> BN-ReLU-conv3-tanh."""

    def __init__(self, *, image_size: int, channels: int, latent_dim: int, ngf: int, num_classes: int = 0):
        nn.Module.__init__(self)
        n = _ups(image_size)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        c = ngf * 2 ** (n - 1)
        self.c0 = c
        self.fc = nn.Linear(latent_dim * (2 if num_classes else 1), c * 16)
        blocks = []
        for i in range(n):
            cout = max(ngf, c // 2) if i < n - 1 else ngf
            blocks.append(_GBlock(c, cout))
            c = cout
        self.net = nn.Sequential(*blocks, nn.BatchNorm2d(c), nn.ReLU(True), nn.Conv2d(c, channels, 3, 1, 1), nn.Tanh())
        self.apply(_init_resnet)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.fc(self._input(z, y)).view(z.shape[0], self.c0, 4, 4))


class ResNetDiscriminator(Discriminator):
    """Down-blocks doubling the width from ndf to ndf x 2^(n-1) at 4x4 -> ReLU -> global sum -> linear,
    plus the projection term of a conditional D."""

    def __init__(self, *, image_size: int, channels: int, ndf: int, norm: str = "none",
                 spectral: bool = True, num_classes: int = 0):
        nn.Module.__init__(self)
        n = _ups(image_size)
        sn = spectral_norm if spectral else (lambda m: m)
        blocks, c = [], channels
        for i in range(n):
            cout = ndf * 2 ** i
            blocks.append(_DBlock(c, cout, sn, norm, first=i == 0))
            c = cout
        self.net = nn.Sequential(*blocks, nn.ReLU())
        self.head = sn(nn.Linear(c, 1))
        self.embed = sn(nn.Embedding(num_classes, c)) if num_classes else None
        self.apply(_init_resnet)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.net(x).sum(dim=(2, 3))  # global sum pooling
        out = self.head(h).squeeze(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("this discriminator is class-conditional: pass labels y")
            out = out + (self.embed(y) * h).sum(1)
        return out


def _init_resnet(m: nn.Module) -> None:
    """Xavier-uniform weights (SNGAN's), zero biases, unit norm scales."""
    if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
        w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
        nn.init.xavier_uniform_(w)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


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
    """G and D for a resolved config (channels, d_norm and num_classes concrete), of model.arch."""
    d, m = cfg.data, cfg.model
    Generator_, Discriminator_ = (ResNetGenerator, ResNetDiscriminator) if m.arch == "resnet" else (
        Generator, Discriminator)
    g = Generator_(image_size=d.image_size, channels=d.channels, latent_dim=m.latent_dim, ngf=m.ngf,
                  num_classes=m.num_classes)
    dis = Discriminator_(image_size=d.image_size, channels=d.channels, ndf=m.ndf, norm=m.d_norm,
                        spectral=m.spectral_norm, num_classes=m.num_classes)
    return g, dis


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

