"""One rule for randomness (seeds.py): streams from train.seed and a purpose; image i of seed s is one image."""

import numpy as np
import pytest
import torch

from aigc_ray import seeds
from aigc_ray.gan.step import fixed_noise


def test_streams_differ_by_purpose_worker_and_step_and_repeat_exactly():
    got = {(p, i): seeds.derive(0, p, i) for p in seeds.PURPOSES for i in range(3)}
    assert len(set(got.values())) == len(got)  # no two streams share a seed
    assert seeds.derive(0, "init") == seeds.derive(0, "init") != seeds.derive(1, "init")
    assert all(0 <= v < seeds.MAX_SEED - seeds.SPAN for v in got.values())
    with pytest.raises(ValueError, match="unknown purpose"):
        seeds.derive(0, "typo")


def test_image_i_of_seed_s_is_one_image_in_sample_eval_and_the_grid(tiny):
    """`eval --seed 7` scores the images `sample --seed 7` shows; split over 2 workers, the same ones; the
    checkpoint's grid is images 0..63 of the run's grid seed."""
    from aigc_ray import train
    from aigc_ray.checkpoint import load_generator
    from aigc_ray.images import to_uint8
    from aigc_ray.metrics import generated_images
    from aigc_ray.serve import Sampler

    out = train.fit(tiny(train__steps=2), quiet=True)
    g, cfg, _ = load_generator(out["checkpoint"])
    sampler = Sampler(out["checkpoint"])
    shown = sampler.forward(sampler.noise(seeds.image_seeds(7, 16), None))  # (16, H, W, C) uint8
    scored = generated_images(g, cfg, 16, seed=7).permute(0, 2, 3, 1).numpy()
    assert np.abs(shown.astype(int) - scored.astype(int)).max() <= 1  # CPU kernels may pick by batch size
    halves = [generated_images(g, cfg, 16, seed=7, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.stack([halves[0], halves[1]], 1).flatten(0, 1), generated_images(g, cfg, 16, seed=7))
    z, _ = fixed_noise(cfg)
    assert torch.equal(z, seeds.latents(seeds.image_seeds(seeds.derive(cfg.train.seed, "grid"), 64), 16))
    grid_first = to_uint8(g(z[:1].clone(), None))[0].permute(1, 2, 0).numpy()
    again = sampler.forward(sampler.noise([seeds.derive(cfg.train.seed, "grid")], None))[0]
    assert np.abs(grid_first.astype(int) - again.astype(int)).max() <= 1
