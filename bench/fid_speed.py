"""Speed of FID's parts, measured in one run: extractor images/s (Inception with channels_last inputs, the
default, and NCHW), and our eigendecomposition vs scipy's sqrtm.

    python bench/fid_speed.py --images 200 --threads 2
"""

import argparse
import json
import time

import numpy as np
import torch

from aigc_ray import data, metrics
from aigc_ray.metrics import features
from aigc_ray.config import DataConfig


def _rate(fn, images, repeats=1):
    fn(images[:8])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(images)
    return repeats * len(images) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="images through the Inception network [200]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ray-tasks", default="", help="also time Inception statistics over Ray tasks, e.g. 1,2")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DataConfig(dataset="fashion-mnist")
    images = data.load(cfg, "test").images

    nchw_net, net = features.Inception(channels_last=False), features.Inception()  # the default: channels_last
    inception_nchw = _rate(nchw_net, images[:args.images])
    inception = _rate(net, images[:args.images])
    same = float((net(images[:16]) - nchw_net(images[:16])).abs().max())
    domain = _rate(features.domain(cfg), images[:5000], repeats=2)

    from scipy import linalg

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * args.dim, args.dim))
    s1 = np.cov(x[: 2 * args.dim].T)
    s2 = np.cov((x[2 * args.dim:] * 1.1 + 0.1).T)
    mu = np.zeros(args.dim)
    t0 = time.perf_counter()
    ours = metrics.frechet_distance(mu, s1, mu, s2)
    t_eig = time.perf_counter() - t0
    t0 = time.perf_counter()
    covmean = linalg.sqrtm(s1 @ s2).real
    theirs = float(np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    t_sqrtm = time.perf_counter() - t0
    tasks = {}
    if args.ray_tasks:  # the same statistics, computed by k one-CPU Ray tasks (as `aigc-ray eval --num-workers k`)
        import ray

        ray.init(num_cpus=args.threads, logging_level="ERROR")
        for k in map(int, args.ray_tasks.split(",")):
            metrics.compute({"images": images[:8]}, "fid", cfg, "stats", num_workers=k)  # warm-up: workers, weights
            t0 = time.perf_counter()
            metrics.compute({"images": images[:args.images]}, "fid", cfg, "stats", num_workers=k)
            tasks[f"inception_images_per_s_{k}_ray_tasks"] = round(args.images / (time.perf_counter() - t0), 1)
        ray.shutdown()
    print(json.dumps({
        **tasks,
        "threads": args.threads,
        "inception_images_per_s": round(inception, 1),
        "inception_nchw_images_per_s": round(inception_nchw, 1),
        "channels_last_vs_nchw": round(inception / inception_nchw, 2),
        "channels_last_max_feature_difference": same,
        "domain_images_per_s": round(domain, 1),
        "domain_vs_inception": round(domain / inception, 1),
        f"eigh_fid_s_at_{args.dim}d": round(t_eig, 3),
        f"scipy_sqrtm_fid_s_at_{args.dim}d": round(t_sqrtm, 3),
        "sqrtm_vs_eigh": round(t_sqrtm / t_eig, 2),
        "relative_difference": abs(ours - theirs) / abs(theirs),
    }, indent=2))


if __name__ == "__main__":
    main()
