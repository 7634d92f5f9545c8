"""The floor a Fashion-MNIST generator can reach: standard (Inception) FID of 10k train images vs the test set.

    python bench/fid_floor.py            # ~25 min on 2 CPUs; the test-set statistics are cached for `eval`

Real images against real images: no generator at 32x32 should expect to score below this.
"""

import argparse
import json
import time

from aigc_ray import data, metrics
from aigc_ray.config import DataConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="train images (the first n) [10000]")
    p.add_argument("--metric", default="fid", choices=["fid", "fid-domain"])
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args()
    cfg = DataConfig(dataset="fashion-mnist", image_size=args.image_size)
    t0 = time.time()
    ref = metrics.reference(cfg, "test", args.metric)
    train = data.load(cfg, "train").images[:args.n]
    stats = metrics.compute({"images": train}, args.metric, cfg, "stats")
    print(json.dumps({"metric": args.metric, "train_images": stats.n, "test_images": ref["stats"].n,
                      "image_size": args.image_size, "value": round(metrics.fid_from_stats(stats, ref["stats"]), 3),
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
