"""Features of image sets and of generators, on this process or fanned out over Ray tasks: each task takes
every world-th image (or sample) and the parts are combined (statistics summed, features concatenated)."""

from __future__ import annotations

import torch

from ..checkpoint import load_generator
from ..config import Config, DataConfig
from ..gan.models import generate
from ..images import to_uint8
from ..seeds import image_seeds, latents
from .distances import FeatureStats
from .features import _inception_cached, extractor


def generated_images(g, cfg: Config, n: int, seed: int, rank: int = 0, world: int = 1, device="cpu",
                     batch: int = 250) -> torch.Tensor:
    """This worker's share (every world-th of n) of n samples as uint8; the union is world-independent."""
    z = latents(image_seeds(seed, n)[rank::world], cfg.model.latent_dim)  # image i: noise(seed + i), as sample
    y = (torch.arange(n) % cfg.model.num_classes)[rank::world] if cfg.model.conditional else None
    parts = [torch.zeros(0, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, dtype=torch.uint8)]
    for i in range(0, len(z), batch):
        yi = None if y is None else y[i:i + batch].to(device)
        parts.append(to_uint8(generate(g, z[i:i + batch].to(device), yi)))
    return torch.cat(parts)


def shippable(metric: str, data_cfg: DataConfig):
    """The extractor as a Ray task receives it: the domain classifier itself (made once, by the caller, so
    no node trains one of its own), or the name of the Inception network that ships inside the package."""
    return "inception" if metric in ("fid", "kid") else extractor(metric, data_cfg)


def unship(ext, device="cpu"):
    return _inception_cached(str(device)) if ext == "inception" else ext.to(device)


def _part(source: dict, ext, want: str, rank: int, world: int):
    """One worker's share of a source (images, or a checkpoint's generator): stats, features or probs."""
    if "images" in source:
        images = source["images"][rank::world]
    else:
        g, cfg, _ = load_generator(source["checkpoint"])
        images = generated_images(g, cfg, source["n"], source["seed"], rank, world)
    ext = unship(ext)
    if want == "probs":
        return ext.probs(images)
    feats = ext(images)
    return FeatureStats(feats.shape[1]).add(feats) if want == "stats" else feats


def compute(source: dict, metric: str, data_cfg: DataConfig, want: str = "stats", num_workers: int = 0):
    """_part on num_workers Ray tasks (0: this process), combined: stats summed, features concatenated."""
    ext = shippable(metric, data_cfg)
    if num_workers <= 0:
        parts = [_part(source, ext, want, 0, 1)]
    else:
        import ray  # only where tasks fan out: a plain evaluation on this process never imports Ray

        task = ray.remote(num_cpus=1)(_part)
        ref, ext_ref = ray.put(source), ray.put(ext)
        parts = ray.get([task.remote(ref, ext_ref, want, r, num_workers) for r in range(num_workers)])
    if want != "stats":
        return torch.cat(parts)
    total = FeatureStats(parts[0].s1.shape[0])
    for p in parts:
        total.merge(p)
    return total

