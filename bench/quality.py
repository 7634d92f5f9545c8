"""Better images per image seen: the canonical DCGAN recipe vs the old and the new defaults, same budget.

    python bench/quality.py --images 192000 --seeds 0 1 2 --fid-samples 10000 --ref-images 10000
    python bench/quality.py --few-shot 500 --steps 2000          # with and without augmentation

Every recipe trains in this process (no Ray, the same torch threads) on Fashion-MNIST 32x32 until D has
seen --images real images, then its G (G_ema where the recipe keeps one) makes --fid-samples images from
fixed seeds, scored by the standard FID (Inception) against the first --ref-images test images, and by
the domain FID (and, few-shot, the memorization audit's copy rate against the training images). One JSON
line per run, then a table of mean +- sd per recipe with wall time and images/s.

The canonical recipe is written out plainly below (pytorch/examples/dcgan at 32x32: nz 100, BCE, Adam
2e-4 / beta1 0.5, batch 64, BatchNorm in G and D, no EMA); the other two are aigc_ray's train step with
the configs they name, so the comparison is of recipes, not of loops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from aigc_ray import data, metrics
from aigc_ray.config import Config, DataConfig, replace
from aigc_ray.plan import resolve
from aigc_ray.gan.step import build_state, train_step

OLD_DEFAULTS = {  # aigc_ray's defaults before the quality work (commit 7e36973)
    "model.arch": "dcgan", "model.latent_dim": 128, "model.spectral_norm": False, "model.d_norm": "batch",
    "loss.name": "bce", "optim.lr_g": 2e-4, "optim.lr_d": 2e-4, "optim.beta1": 0.5, "optim.beta2": 0.999,
    "train.ema_decay": 0.999, "augment.policy": "none",
}


class CanonicalG(nn.Module):
    """pytorch/examples DCGAN generator at 32x32 (one upsampling fewer than its 64x64)."""

    def __init__(self, nz=100, ngf=64, nc=1):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z, y=None):
        return self.net(z[:, :, None, None])


class CanonicalD(nn.Module):
    def __init__(self, ndf=64, nc=1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x):
        return self.net(x).view(-1)


def _init(m):
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def canonical(ds: data.ImageSet, images: int, seed: int) -> tuple[nn.Module, float]:
    """The pytorch/examples training loop, as written there (real batch, fake batch, then G)."""
    torch.manual_seed(seed)
    g, d = CanonicalG(), CanonicalD()
    g.apply(_init)
    d.apply(_init)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCELoss()
    batches = data.Batches(ds, 64, seed=seed)
    t0 = time.perf_counter()
    for _ in range(images // 64):
        real, _ = batches()
        ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
        d.zero_grad()
        bce(d(real), ones).backward()
        fake = g(torch.randn(len(real), 100))
        bce(d(fake.detach()), zeros).backward()
        opt_d.step()
        g.zero_grad()
        bce(d(fake), ones).backward()
        opt_g.step()
    return g.eval(), time.perf_counter() - t0


def ours(ds: data.ImageSet, images: int, seed: int, overrides: dict, every: int = 0,
         on_the_way=lambda g, seen, secs, cfg: None) -> tuple[nn.Module, float, Config]:
    """aigc_ray's train step with a config, in a plain loop; returns G_ema (or G) and the training time.
    With `every`, on_the_way(G, images seen, training seconds so far, cfg) is called after every `every`
    steps but the last (its time is not counted: the curve of one run, not a slower run)."""
    cfg = replace(Config(), {"data.dataset": "fashion-mnist", "train.seed": seed, **overrides})
    cfg = resolve(cfg, channels=1, num_classes=10, size=len(ds))
    state = build_state(cfg)
    batches = data.Batches(ds, cfg.train.batch_size, seed=seed)
    per_step = cfg.train.batch_size * cfg.loss.n_critic
    steps, secs = images // per_step, 0.0
    g = state.g_ema if state.g_ema is not None else state.g
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        train_step(state, batches, cfg)
        secs += time.perf_counter() - t0
        if every and step % every == 0 and step < steps:  # leaves the run as it was: same mode, same RNG
            mode, rng = g.training, torch.get_rng_state()
            on_the_way(g.eval(), step * per_step, secs, cfg)
            g.train(mode)
            torch.set_rng_state(rng)
    return g.eval(), secs, cfg


def score(g: nn.Module, latent: int, n: int, ref_images: int, dcfg: DataConfig, limit: int = 0) -> dict:
    """Standard and domain FID of n images from fixed seeds against the test split's first ref_images; with a
    limit (few-shot), also the memorization audit's copy rate against the `limit` training images."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2024)
        x = torch.cat([g(torch.randn(min(500, n - i), latent, generator=gen)) for i in range(0, n, 500)])
    images = x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    out = {}
    for metric in ("fid", "fid-domain"):
        ref = metrics.reference(dcfg, "test", metric, max_images=ref_images, log=lambda *a: None)
        stats = metrics.compute({"images": images}, metric, dcfg, "stats")
        out[metric.replace("-", "_")] = round(metrics.fid_from_stats(stats, ref["stats"]), 3)
    if limit:
        out["copy_rate"] = round(copies(images, DataConfig(dataset=dcfg.dataset, limit=limit)), 4)
    return out


def copies(images: torch.Tensor, d: DataConfig, heldout: int = 1000) -> float:
    """aigc-ray audit's copy rate (domain features): the share of samples nearer one of the d.limit training
    images than all but 1% of held-out training images (those beyond the limit) are."""
    from aigc_ray import audit

    def feats(x):
        return metrics.compute({"images": x}, "fid-domain", d, "features")

    f_train = feats(data.load(d).images)
    d_samples, _ = audit.nearest(feats(images), f_train)
    d_held, _ = audit.nearest(feats(audit.heldout_images(d, heldout)[0]), f_train)
    return audit.copy_rate(d_samples, d_held)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=192000, help="real images D sees per run [192000]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=["canonical", "old", "new"])
    p.add_argument("--fid-samples", type=int, default=10000)
    p.add_argument("--ref-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--few-shot", type=int, default=0, help="train on the first N images only, with and "
                   "without augmentation (new defaults), for --steps G steps")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--score-every", type=int, default=0, metavar="STEPS",
                   help="also score aigc_ray's runs every STEPS train steps on the way (one row each): a curve")
    p.add_argument("--policies", nargs="+", default=["auto", "none"],
                   help="few-shot augmentation arms: auto (the default), none, a comma list of "
                   "color,translation,cutout, or ada (all three with adaptive p from 0) [auto none]")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dcfg = DataConfig(dataset="fashion-mnist")
    full = data.load(dcfg)
    rows = []
    if args.few_shot:
        ds = data.load(DataConfig(dataset="fashion-mnist", limit=args.few_shot))
        ada = {"augment.policy": "color,translation,cutout", "augment.adaptive": True, "augment.p": 0.0}
        runs = [(f"{args.few_shot}-shot, augment {pol}", ada if pol == "ada" else {"augment.policy": pol})
                for pol in args.policies]
        budget = args.steps * Config().train.batch_size
    else:
        ds, budget = full, args.images
        runs = [(r, {"old": OLD_DEFAULTS, "new": {}}.get(r)) for r in args.recipes]
    for name, overrides in runs:
        for seed in args.seeds:
            def row(g, latent, seen, secs, final=True):
                r = {"recipe": name, "seed": seed, "images_seen": seen, "train_images": len(ds),
                     "seconds": round(secs, 1), "images_per_s": round(seen / secs, 1),
                     **score(g, latent, args.fid_samples, args.ref_images, dcfg, args.few_shot)}
                print(json.dumps(r if final else {**r, "on_the_way": True}), flush=True)
                return r

            if overrides is None:
                g, secs = canonical(ds, budget, seed)
                latent = 100
            else:
                g, secs, cfg = ours(ds, budget, seed, overrides, args.score_every,
                                    lambda g, seen, t, cfg: row(g, cfg.model.latent_dim, seen, t, final=False))
                latent = cfg.model.latent_dim
            rows.append(row(g, latent, budget, secs))
    copy = " copy rate |" if args.few_shot else ""
    print(f"\n| recipe | FID (Inception, {args.fid_samples} vs {args.ref_images} test) | domain FID | "
          f"train s | images/s |{copy}\n|---|---|---|---|---|{'---|' if copy else ''}")
    for name, _ in runs:
        rs = [r for r in rows if r["recipe"] == name]

        def ms(k):
            v = [r[k] for r in rs]
            return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
        print(f"| {name} | {ms('fid')} | {ms('fid_domain')} | {ms('seconds')} | {ms('images_per_s')} |"
              + (f" {ms('copy_rate')} |" if copy else ""))


if __name__ == "__main__":
    main()
