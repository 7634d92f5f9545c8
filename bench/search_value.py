"""Does searching pay? The default config, random search + ASHA and PBT, each given the same G steps.

    python bench/search_value.py --budget 6000 --members 3 --fid-samples 2000 --ref-images 2000

On Fashion-MNIST 32x32, on the local Ray cluster this starts:
1. the default config trained for the whole budget (one run of `budget` steps);
2. random search + ASHA over the default space: `members` trials of budget / members steps at most
   (ASHA stops some early, so it spends at most the budget);
3. PBT: `members` members of budget / members steps each (exactly the budget), perturbing learning rates,
   betas and EMA decay every budget / members / 4 steps.

Each result's best checkpoint is scored by the standard FID (Inception) of --fid-samples images against the
first --ref-images test images. One JSON line per arm, then a table with the wall time of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from aigc_ray import metrics, train, tune
from aigc_ray.cli import init_ray
from aigc_ray.config import Config, replace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=6000, help="G steps each arm may spend [6000]")
    p.add_argument("--members", type=int, default=3, help="trials of the searches [3]")
    p.add_argument("--fid-samples", type=int, default=2000)
    p.add_argument("--ref-images", type=int, default=2000)
    p.add_argument("--storage", default="", help="where the runs go [a temporary folder]")
    p.add_argument("--arms", nargs="+", default=["default", "asha", "pbt"], choices=["default", "asha", "pbt"])
    args = p.parse_args()
    root = args.storage or tempfile.mkdtemp(prefix="search_value_")
    init_ray()
    base = replace(Config(), {"data.dataset": "fashion-mnist", "run.storage": root})
    per = args.budget // args.members
    every = max(50, per // 4)
    rows = []

    def score(name: str, checkpoint: str, steps: int, seconds: float, copies: int | None = None) -> None:
        fid = metrics.evaluate(checkpoint, "fid", args.fid_samples, ref_images=args.ref_images)["value"]
        row = {"arm": name, "fid": round(fid, 2), "g_steps": steps, "seconds": round(seconds, 1),
               "checkpoint": checkpoint, "pbt_copies": copies}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "default" in args.arms:
        t0 = time.time()
        out = train.fit(replace(base, {"run.name": "default", "train.steps": args.budget,
                                       "train.ckpt_every": every, "train.log_every": every}), quiet=True)
        score("default config, whole budget", out["checkpoint"], args.budget, time.time() - t0)
    for name, scheduler in (("random search + ASHA", "asha"), ("PBT", "pbt")):
        if scheduler not in args.arms:
            continue
        t0 = time.time()
        best = tune.search(base, tune.Search(name=scheduler, num_trials=args.members, max_steps=per,
                                             metric="fid-domain", eval_every=every, scheduler=scheduler,
                                             quantile=0.5 if args.members < 4 else 0.25), log=lambda *a: None)
        score(name, best["checkpoint"], best["steps_run"], time.time() - t0, best.get("copies"))
    print(f"\n| arm | FID (Inception, {args.fid_samples} vs {args.ref_images} test) | G steps spent | wall s |\n"
          "|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['fid']:.2f} | {r['g_steps']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
