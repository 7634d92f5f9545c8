"""Your digital double, measured: identity-conditional training on the AT&T/ORL faces (8 photos of each of 40
people; photos 9-10 held out), scored against training time.

    python bench/faces.py --sizes 32 64 --minutes 30 15 --out docs/faces

For each image size, `aigc-ray train --dataset orl-faces` with the defaults (conditional on the person,
translation + cutout augmentation: what orl-faces gets automatically) runs in this process in segments; after
each segment G_ema is scored:
- identity fidelity: of 10 images generated for each person k, the share that a face-identity classifier
  assigns to k. The classifier is aigc_ray's domain classifier trained on the 320 real training photos
  (LeNet-sized, metrics.features.DomainNet); its accuracy on the 80 held-out photos is printed beside it;
- copy rate: the memorization audit (domain features) against the 320 training photos, with the held-out
  photos as the reference of "close but new";
- KID (Inception features) of 400 samples against the 80 held-out photos;
- CPU time: wall seconds of training so far on this machine.
At the end: GAN inversion of a held-out photo of 10 trained people (their class given): the pixel error of
the reconstruction against that of random latents of the same class, and seconds per inversion; and a grid
of real photos beside generated doubles (<out>_<size>px.png). One JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aigc_ray import audit, data, metrics, train
from aigc_ray.metrics import features
from aigc_ray.checkpoint import load_generator
from aigc_ray.config import Config, DataConfig, replace
from aigc_ray.images import grid, png_bytes, to_uint8
from aigc_ray.invert import invert
from aigc_ray.gan.models import generate
from aigc_ray.seeds import image_seeds, latents


def doubles(g, cfg, per: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """per images of every person (uint8), and their labels."""
    n = cfg.model.num_classes * per
    y = torch.arange(n) // per
    z = latents(image_seeds(seed, n), cfg.model.latent_dim)
    with torch.no_grad():
        return to_uint8(generate(g, z, y)), y


def score(checkpoint: str, size: int, seconds: float, step: int) -> dict:
    g, cfg, _ = load_generator(checkpoint)
    d = DataConfig(dataset="orl-faces", image_size=size, channels=1)
    ident = features.domain(d)
    images, y = doubles(g, cfg)
    fidelity = float((ident.probs(images).argmax(1) == y).float().mean())
    found = audit.run(checkpoint, num_samples=400, heldout=80, features="domain", out=tempfile.mkdtemp())
    held = data.load(d, "test").images
    inception = features.extractor("kid", d)
    kid, kid_sd = metrics.kid(inception(held), inception(images), subsets=50, subset_size=80)
    return {"size": size, "step": step, "train_seconds": round(seconds), "identity_fidelity": round(fidelity, 4),
            "identity_classifier_heldout_accuracy": round(ident.accuracy, 4), "copy_rate": found["copy_rate"],
            "kid": round(kid, 5), "kid_sd": round(kid_sd, 5), "checkpoint": checkpoint}


def inversion(checkpoint: str, size: int, people: int = 10, steps: int = 150) -> dict:
    g, cfg, _ = load_generator(checkpoint)
    held = data.load(DataConfig(dataset="orl-faces", image_size=size, channels=1), "test")
    errs, rand, secs = [], [], []
    for k in range(people):
        photo = held.images[2 * k:2 * k + 1].float() / 127.5 - 1  # photo 9 of person k
        inv = invert(g, cfg, photo, label=k, steps=steps)
        errs.append(inv.pixel_error)
        secs.append(inv.seconds)
        with torch.no_grad():
            x = g(latents(image_seeds(1000 + 16 * k, 16), cfg.model.latent_dim), torch.full((16,), k))
        rand.append(float(((x - photo).abs() * 127.5).mean()))
    return {"size": size, "inverted_pixel_error": round(float(np.mean(errs)), 2),
            "random_latent_pixel_error": round(float(np.mean(rand)), 2),
            "seconds_per_inversion": round(float(np.mean(secs)), 2), "people": people, "steps": steps}


def side_by_side(checkpoint: str, size: int, out: Path, people: int = 6) -> None:
    """Row k: 4 real training photos of person k, then 4 of their generated doubles."""
    g, cfg, _ = load_generator(checkpoint)
    real = data.load(DataConfig(dataset="orl-faces", image_size=size, channels=1), "train")
    rows = []
    for k in range(people):
        with torch.no_grad():
            fake = to_uint8(generate(g, latents(image_seeds(50 * k, 4), cfg.model.latent_dim), torch.full((4,), k)))
        rows.append(torch.cat([real.images[8 * k:8 * k + 4], fake]))
    out.write_bytes(png_bytes(grid(torch.cat(rows), nrow=8)))


def run(size: int, minutes: float, segments: int, root: Path, out: str, seed: int) -> list[dict]:
    storage = root / f"faces{size}"
    cfg = replace(Config(), {"data.dataset": "orl-faces", "data.image_size": size, "train.num_workers": 0,
                             "train.log_every": 100, "train.ckpt_every": 100, "train.seed": seed,
                             "run.name": f"orl{size}", "run.storage": str(storage)})
    results, spent, step, chunk = [], 0.0, 0, 200
    for i in range(segments):
        budget = minutes * 60 * (i + 1) / segments
        while spent < budget:  # train in chunks until this segment's share of the time is spent
            t0 = time.time()
            step += chunk
            done = train.fit(replace(cfg, {"train.steps": step}), quiet=True)
            spent += time.time() - t0
        r = score(done["checkpoint"], size, spent, step)
        print(json.dumps(r), flush=True)
        results.append(r)
    inv = inversion(done["checkpoint"], size)
    print(json.dumps(inv), flush=True)
    results.append(inv)
    side_by_side(done["checkpoint"], size, Path(f"{out}_{size}px.png"))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--minutes", type=float, nargs="+", default=[30, 30], help="training minutes per size")
    p.add_argument("--segments", type=int, default=3, help="evaluations along the way, per size")
    p.add_argument("--out", default="docs/faces", help="prefix of the grids (<out>_<size>px.png)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(tempfile.mkdtemp(prefix="aigc_faces_"))
    try:
        for size, minutes in zip(args.sizes, args.minutes):
            run(size, minutes, args.segments, root, args.out, args.seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
