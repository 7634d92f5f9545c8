"""Images/s of the Ray Train loop (1 worker, and N workers) beside the same train step in a plain loop.

    python bench/train_throughput.py --steps 300 --threads 2 --batch-size 64

Same model, batch, data and torch threads on both sides; the plain loop runs before and after Ray
(their mean is the baseline), and every figure comes from this one run. The Ray figure is the median
images/s over the reported windows after the first (warm-up); the plain figure likewise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aigc_ray import data, train
from aigc_ray.config import Config, replace, resolve


def plain_loop(cfg: Config, steps: int, window: int) -> float:
    """The train step in this process, no Ray: images/s over the windows after the first."""
    torch.set_num_threads(cfg.train.cpus_per_worker)
    rcfg = resolve(cfg, channels=1, num_classes=10)
    state = train.build_state(rcfg)
    batches = data.Batches(data.load(rcfg.data), rcfg.train.batch_size, seed=0)
    rates, t0 = [], time.perf_counter()
    for s in range(1, steps + 1):
        train.train_step(state, batches, rcfg)
        if s % window == 0:
            float(state.opt_g.param_groups[0]["lr"])  # the Ray loop's report does a small sync here too
            now = time.perf_counter()
            rates.append(window * rcfg.loss.n_critic * rcfg.train.batch_size / (now - t0))
            t0 = now
    return statistics.median(rates[1:])


def ray_loop(cfg: Config, steps: int, window: int, workers: int, storage: str) -> float:
    """The Ray Train loop: images/s from its TensorBoard events, windows after the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = replace(cfg, {"train.num_workers": workers, "run.name": f"bench-{workers}w-{time.time_ns()}",
                        "run.storage": storage})
    out = train.fit(cfg, quiet=True)
    acc = EventAccumulator(str(Path(out["run_dir"]) / "tensorboard"))
    acc.Reload()
    rates = [e.value for e in acc.Scalars("images_per_s")]
    return statistics.median(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50, help="steps per measured window (= log_every)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, on both sides")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--loss", default="bce")
    p.add_argument("--two-workers", action="store_true", help="also measure 2 workers x threads/2 each")
    args = p.parse_args()

    import ray

    ray.init(logging_level="WARNING")
    time.sleep(10)  # let the new cluster's own processes settle before timing anything
    cfg = replace(Config(), {"data.dataset": args.dataset, "loss.name": args.loss,
                             "train.batch_size": args.batch_size, "train.steps": args.steps,
                             "train.log_every": args.window, "train.ckpt_every": args.steps,
                             "train.cpus_per_worker": args.threads, "train.use_gpu": False})
    with tempfile.TemporaryDirectory() as storage:
        plain_a = plain_loop(cfg, args.steps, args.window)
        ray_1 = ray_loop(cfg, args.steps, args.window, 1, storage)
        plain_b = plain_loop(cfg, args.steps, args.window)
        ray_2 = None
        if args.two_workers:
            two = replace(cfg, {"train.cpus_per_worker": max(1, args.threads // 2)})
            ray_2 = ray_loop(two, args.steps, args.window, 2, storage)
    plain = (plain_a + plain_b) / 2
    result = {"plain_images_per_s": round(plain, 1), "plain_runs": [round(plain_a, 1), round(plain_b, 1)],
              "ray_1_worker_images_per_s": round(ray_1, 1), "ratio_ray_1_worker_vs_plain": round(ray_1 / plain, 3),
              "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps, "loss": args.loss}
    if ray_2 is not None:
        result.update(ray_2_workers_images_per_s=round(ray_2, 1), ratio_2_workers_vs_1=round(ray_2 / ray_1, 3))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
