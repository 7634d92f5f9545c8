"""GAN losses as pure functions of networks and tensors, selected by name.

    d_loss, g_loss = LOSSES["wgan-gp"]
    loss, stats = d_loss(D, real, fake, y, cfg.loss)    # stats: detached tensors for logging

D returns raw scores (logits / critic values), one per image. Every loss here is minimised.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig

Stats = dict[str, torch.Tensor]


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] on random interpolates (Gulrajani et al. 2017).

    torch.autograd.grad(create_graph=True) keeps the penalty differentiable for D's own backward;
    computed in float32 even under autocast, since fp16 gradients of gradients underflow.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (alpha * real.float() + (1 - alpha) * fake.float()).requires_grad_(True)
    with torch.autocast(device_type=real.device.type, enabled=False):
        out = D(x_hat, y)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def r1_penalty(D: nn.Module, real: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """E[||grad_x D(x)||^2] on real images (Mescheder et al. 2018): D flat on the data, in float32."""
    x = real.detach().float().requires_grad_(True)
    with torch.autocast(device_type=real.device.type, enabled=False):
        out = D(x, y)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def _scores(D, real, fake, y):
    return D(real, y).float(), D(fake, y).float()


def _stats(s_real: torch.Tensor, s_fake: torch.Tensor, threshold: float = 0.0) -> Stats:
    """What D said, for logging, and ADA's overfitting signal r_t = E[sign(D(real) - threshold)]."""
    s_real, s_fake = s_real.detach(), s_fake.detach()
    return {"d_real": s_real.mean(), "d_fake": s_fake.mean(), "r_t": (s_real - threshold).sign().mean()}


# D's losses are means of per-image terms on real and fake scores; DP sums the same terms (per_example_d).
D_TERMS: dict[str, tuple[Callable, Callable, float]] = {  # (real term, fake term, r_t threshold)
    "bce": (lambda s: F.softplus(-s), lambda s: F.softplus(s), 0.0),
    "hinge": (lambda s: F.relu(1 - s), lambda s: F.relu(1 + s), 0.0),
    "lsgan": (lambda s: 0.5 * (s - 1).pow(2), lambda s: 0.5 * s.pow(2), 0.5),
}


def _from_terms(name: str, D, real, fake, y) -> tuple[torch.Tensor, Stats]:
    on_real, on_fake, threshold = D_TERMS[name]
    s_real, s_fake = _scores(D, real, fake, y)
    return on_real(s_real).mean() + on_fake(s_fake).mean(), _stats(s_real, s_fake, threshold)


def per_example_d(D, real, fake, y_real, y_fake, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    """DP-SGD's D loss: one call of D on real + fake, the SUM of per-image terms (Opacus clips each image's
    gradient, then averages by the expected batch). real may be empty (a Poisson batch)."""
    on_real, on_fake, threshold = D_TERMS[cfg.name]
    n = real.shape[0]
    y = None if y_real is None else torch.cat([y_real, y_fake])
    s = D(torch.cat([real, fake]), y).float()
    s_real, s_fake = s[:n], s[n:]
    stats = _stats(s_real, s_fake, threshold) if n else _stats(s_fake.new_zeros(1), s_fake, threshold)
    return on_real(s_real).sum() + on_fake(s_fake).sum(), stats


# Non-saturating DCGAN loss: D maximises log D(x) + log(1 - D(G(z))); G maximises log D(G(z)).
def bce_d(D, real, fake, y, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    return _from_terms("bce", D, real, fake, y)


def bce_g(D, fake, y, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    return F.softplus(-D(fake, y).float()).mean(), {}


# WGAN-GP: the critic estimates the Wasserstein-1 distance, kept 1-Lipschitz by the gradient penalty.
def wgan_gp_d(D, real, fake, y, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    s_real, s_fake = _scores(D, real, fake, y)
    gp = gradient_penalty(D, real, fake, y)
    wasserstein = s_real.mean() - s_fake.mean()
    return -wasserstein + cfg.gp_weight * gp, {"wasserstein": wasserstein.detach(), "gp": gp.detach(),
                                               "r_t": s_real.detach().sign().mean()}


def wgan_g(D, fake, y, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    return -D(fake, y).float().mean(), {}


# Hinge loss (Lim & Ye 2017; SAGAN, BigGAN).
def hinge_d(D, real, fake, y, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    return _from_terms("hinge", D, real, fake, y)


# Least squares (Mao et al. 2017): targets 1 for real, 0 for fake.
def lsgan_d(D, real, fake, y, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    return _from_terms("lsgan", D, real, fake, y)


def lsgan_g(D, fake, y, cfg: LossConfig) -> tuple[torch.Tensor, Stats]:
    return 0.5 * (D(fake, y).float() - 1).pow(2).mean(), {}


LOSSES: dict[str, tuple[Callable, Callable]] = {
    "bce": (bce_d, bce_g),
    "wgan-gp": (wgan_gp_d, wgan_g),
    "hinge": (hinge_d, wgan_g),  # G's hinge loss is the critic's -mean score, as in WGAN
    "lsgan": (lsgan_d, lsgan_g),
}
