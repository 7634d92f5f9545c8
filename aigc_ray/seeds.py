"""One rule for randomness: every stream comes from train.seed and a named purpose, through `derive`.

    torch.manual_seed(derive(cfg.train.seed, "init"))         # the initial weights
    z = latents(image_seeds(7, 16), latent_dim=128)             # images 0..15 of seed 7, wherever drawn

Purposes: "init" (weights), "data" (a worker's batch order), "worker" (a worker's fakes, augmentation,
labels), "eval" (the noise FID is computed on during training), "grid" (the fixed sample grid of every
checkpoint). Streams of different purposes, workers or steps never share a seed, and none is a small offset
of another (a hash, not seed + 12345).

Sampling seeds: image i of a request with seed s is drawn from z = noise(seed=s + i), one generator per
image, so it is the same image in `sample`, `/generate`, `/interpolate`, `eval`, `audit`, export and the
fixed grids, whatever the batch or the number of workers. The exception is privacy: DP noise and Poisson
sampling draw from OS entropy (privacy.secret_seed), never from here.
"""

from __future__ import annotations

import hashlib

import torch

from .config import MAX_SEED

PURPOSES = ("init", "data", "worker", "eval", "grid")
SPAN = 2**20  # room above a derived sampling seed for image indices s + i


def derive(seed: int, purpose: str, *index: int) -> int:
    """The seed of stream (train.seed, purpose, index...): the first 62 bits of their SHA-256, less SPAN."""
    if purpose not in PURPOSES:
        raise ValueError(f"seeds.derive: unknown purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    digest = hashlib.sha256(":".join(map(str, (int(seed), purpose, *index))).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED - SPAN)


def image_seeds(seed: int, n: int) -> list[int]:
    """The sampling seeds of images 0..n-1 of a request with seed `seed`."""
    if not 0 <= seed <= MAX_SEED - n:
        raise ValueError(f"seed must be in [0, {MAX_SEED - n}] for {n} images, got {seed}")
    return list(range(seed, seed + n))


def latents(seeds: list[int], latent_dim: int, truncation: float | None = None) -> torch.Tensor:
    """One z per sampling seed, each from its own generator (noise): (len(seeds), latent_dim)."""
    if not seeds:
        return torch.zeros(0, latent_dim)
    return torch.cat([noise(1, latent_dim, seed=s, truncation=truncation) for s in seeds])


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
