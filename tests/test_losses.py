import pytest
import torch

from aigc_ray.config import LossConfig
from aigc_ray.gan.losses import LOSSES, gradient_penalty
from aigc_ray.gan.models import Discriminator


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_decreases_d_objective_on_a_fixed_batch(name):
    torch.manual_seed(0)
    d = Discriminator(image_size=32, channels=1, ndf=8, norm="none" if name == "wgan-gp" else "batch")
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    fake = torch.randn(16, 1, 32, 32).clamp(-1, 1) * 0.3
    cfg = LossConfig(name=name)
    d_loss, _ = LOSSES[name]
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    first = None
    for _ in range(8):
        loss, stats = d_loss(d, real, fake, None, cfg)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = d_loss(d, real, fake, None, cfg)[0].item()  # with grads on: the penalty needs them
    assert last < first, (name, first, last)
    assert all(not v.requires_grad for v in stats.values())


def test_g_losses_push_g_towards_what_d_calls_real():
    d = Discriminator(image_size=32, channels=1, ndf=8, norm="none")
    fake = torch.zeros(4, 1, 32, 32, requires_grad=True)
    for name, (_, g_loss) in LOSSES.items():
        loss, _ = g_loss(d, fake, None, LossConfig(name=name))
        (grad,) = torch.autograd.grad(loss, fake)
        assert grad.abs().sum() > 0, name


def test_gradient_penalty_is_nonzero_and_differentiable():
    torch.manual_seed(0)
    d = Discriminator(image_size=32, channels=1, ndf=8, norm="layer")
    real, fake = torch.rand(8, 1, 32, 32), torch.rand(8, 1, 32, 32)
    gp = gradient_penalty(d, real, fake, None)
    assert gp.item() > 0
    assert gp.grad_fn is not None  # create_graph=True kept the graph for D's backward
    grads = torch.autograd.grad(gp, [p for p in d.parameters()], allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
