"""DiffAugment and ADA: differentiable, the same for real and fake, p where the heuristic puts it."""

import pytest
import torch

from aigc_ray import data
from aigc_ray.gan import augment
from aigc_ray.gan.augment import Augment
from aigc_ray.config import ConfigError, validate
from aigc_ray.config import AUGMENTATIONS
from aigc_ray.plan import resolve
from aigc_ray.gan.step import build_state, train_step


@pytest.mark.parametrize("op", AUGMENTATIONS)
def test_each_augmentation_is_differentiable_and_changes_images(op):
    assert set(augment.FUNCS) == set(AUGMENTATIONS)  # the config's vocabulary, every name implemented
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    y = augment.FUNCS[op](x * 2 - 1, 1.0)
    assert y.shape == x.shape and not torch.allclose(y, x * 2 - 1)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # G gets gradients through D's view of its images
    assert torch.allclose(augment.FUNCS[op](x, 0.0), x, atol=1e-6)  # p = 0: untouched


def test_p_is_the_share_of_images_changed():
    torch.manual_seed(0)
    x = torch.rand(4000, 1, 8, 8) * 2 - 1
    changed = (augment.cutout(x, 0.3) != x).flatten(1).any(1).float().mean()
    assert abs(changed - 0.3) < 0.03


def test_d_sees_real_and_fake_through_the_same_augmentation(tiny):
    """With cutout at p=1 every image D is shown, real or fake, in its loss or G's, has a zeroed square."""
    cfg = resolve(tiny(augment__policy="cutout", augment__p=1.0), channels=1, num_classes=10)
    state = build_state(cfg)
    seen = []
    d = state.d
    real_forward = d.forward
    d.forward = lambda x, y=None: (seen.append(x.detach()), real_forward(x, y))[1]
    train_step(state, data.Batches(data.load(cfg.data), 16, seed=0), cfg)
    assert len(seen) == 3  # D(real), D(fake) in D's loss, D(fake) in G's
    for batch in seen:
        zeros = (batch == 0).flatten(1).sum(1)
        assert (zeros >= 8 * 8).all()  # at least a corner-clipped quarter of the 16x16 square
    unaugmented = data.load(cfg.data).images[:16].float() / 127.5 - 1
    assert ((unaugmented == 0).flatten(1).sum(1) < 8 * 8).all()  # the zeros come from the augmentation


def test_ada_moves_p_with_the_overfitting_signal():
    aug = Augment("color,translation,cutout", 0.0, adaptive=True, target=0.6, speed=1000)
    aug.adjust(0.9, 100)  # D too sure of the reals: stronger
    assert aug.p == pytest.approx(0.1)
    aug.adjust(0.1, 300)
    assert aug.p == 0.0  # never below 0
    for _ in range(20):
        aug.adjust(1.0, 100)
    assert aug.p == 1.0  # never above 1


def test_auto_policy_augments_small_datasets_only(tiny):
    small = resolve(tiny(), channels=1, num_classes=10, size=500)
    large = resolve(tiny(), channels=1, num_classes=10, size=60000)
    assert small.augment.policy == "translation,cutout" and large.augment.policy == "none"
    with pytest.raises(ConfigError, match="augment.policy: unknown augmentation"):
        validate(tiny(augment__policy="color,flip"))
    with pytest.raises(ConfigError, match="augment.p"):
        validate(tiny(augment__p=1.5))
