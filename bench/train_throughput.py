"""Images/s of the Ray Train loop (1 worker, and N workers) beside the same train step in a plain loop.

    python bench/train_throughput.py --steps 300 --threads 2 --batch-size 64 [--two-workers] [--cluster]

Same model, batch, data and torch threads on both sides; the plain loop runs before and after Ray
(their mean is the baseline), and every figure comes from this one run. The Ray figure is the median
images/s over the reported windows after the first (warm-up); the plain figure likewise. The Ray
workers get their images through Ray's object store, as in every run. Each Ray line also gives an
end-to-end rate: images over the wall time from the first report to the last, checkpoints included
(written every --ckpt-every steps).

--cluster adds a 2-node line: a head with no CPUs and one worker node in namespaces of its own
(aigc_ray/testing.py), checkpoints going to an S3-compatible server (moto) on loopback; the driver is
`aigc-ray train` on the head, the worker node does the work. It also times checkpoint uploads to that
server (seconds per MB). Linux, as root (mount and PID namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aigc_ray import data, storage, train
from aigc_ray.config import Config, replace
from aigc_ray.plan import resolve
from aigc_ray.gan.step import build_state, train_step


def plain_loop(cfg: Config, steps: int, window: int) -> float:
    """The train step in this process, no Ray: images/s over the windows after the first."""
    torch.set_num_threads(cfg.train.cpus_per_worker)
    rcfg = resolve(cfg, channels=1, num_classes=10)
    state = build_state(rcfg)
    batches = data.Batches(data.load(rcfg.data), rcfg.train.batch_size, seed=0)
    rates, t0 = [], time.perf_counter()
    for s in range(1, steps + 1):
        train_step(state, batches, rcfg)
        if s % window == 0:
            float(state.opt_g.param_groups[0]["lr"])  # the Ray loop's report does a small sync here too
            now = time.perf_counter()
            rates.append(window * rcfg.loss.n_critic * rcfg.train.batch_size / (now - t0))
            t0 = now
    return statistics.median(rates[1:])


def rates(run_dir: str) -> tuple[float, float]:
    """(median window images/s after the first, end-to-end images/s) from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with storage.local_dir(storage.join(run_dir, "tensorboard")) as events:
        acc = EventAccumulator(str(events))
        acc.Reload()
    windows = acc.Scalars("images_per_s")
    seen = acc.Scalars("images_seen")
    if len(seen) < 2:  # one report: its window is all there is
        return windows[0].value, windows[0].value
    e2e = (seen[-1].value - seen[0].value) / (seen[-1].wall_time - seen[0].wall_time)
    return statistics.median([e.value for e in windows[1:]]), e2e


def ray_loop(cfg: Config, steps: int, window: int, workers: int, root: str) -> tuple[float, float]:
    """The Ray Train loop in this process's Ray cluster."""
    cfg = replace(cfg, {"train.num_workers": workers, "run.name": f"bench-{workers}w-{time.time_ns()}",
                        "run.storage": root})
    return rates(train.fit(cfg, quiet=True)["run_dir"])


def cluster_loop(cfg: Config, tmp: str) -> dict:
    """1 worker on the worker node of a 2-node cluster, checkpoints to S3; and checkpoint upload speed."""
    from aigc_ray import checkpoint as ckpt
    from aigc_ray.testing import Cluster, ObjectStore

    t = cfg.train
    flags = ["--dataset", cfg.data.dataset, "--loss", cfg.loss.name, "--batch-size", str(t.batch_size),
             "--steps", str(t.steps), "--log-every", str(t.log_every), "--ckpt-every", str(t.ckpt_every),
             "--cpus-per-worker", str(t.cpus_per_worker), "--num-workers", "1", "--no-gpu",
             "--storage", "s3://aigc/bench", "--name", "cluster", "--json"]
    with (ObjectStore(Path(tmp) / "moto.log") as s3,
          Cluster.up(Path(tmp) / "nodes", env=s3.env, nodes=1, cpus=t.cpus_per_worker) as c):
        r = c.cli("train", *flags, timeout=1800)
        if r.returncode:
            raise SystemExit(f"cluster run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        os.environ.update(s3.env)
        storage._s3.cache_clear()
        window, e2e = rates("s3://aigc/bench/cluster")
        # Checkpoint upload: the run's own last checkpoint, written again to S3 and to a local folder.
        files = {f: storage.read_bytes(f"s3://aigc/bench/cluster/checkpoint_{t.steps:08d}/{f}")
                 for f in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.GRID_FILE, ckpt.META_FILE)}
        mb = sum(len(b) for b in files.values()) / 1e6
        up = []
        for i in range(5):
            t0 = time.perf_counter()
            ckpt.write(f"s3://aigc/bench/upload-{i}", files)
            up.append(time.perf_counter() - t0)
        local = []
        for i in range(5):
            t0 = time.perf_counter()
            ckpt.write(str(Path(tmp) / f"upload-{i}"), files)
            local.append(time.perf_counter() - t0)
    return {"window": window, "e2e": e2e, "checkpoint_mb": round(mb, 1),
            "s3_upload_s_per_mb": round(statistics.median(up) / mb, 4),
            "local_write_s_per_mb": round(statistics.median(local) / mb, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50, help="steps per measured window (= log_every)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, on both sides")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--loss", default="bce")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every this many steps (Ray lines)")
    p.add_argument("--two-workers", action="store_true", help="also measure 2 workers x threads/2 each")
    p.add_argument("--cluster", action="store_true", help="also measure a 2-node cluster with S3 storage")
    args = p.parse_args()

    import ray

    ray.init(logging_level="WARNING")
    time.sleep(10)  # let the new cluster's own processes settle before timing anything
    cfg = replace(Config(), {"data.dataset": args.dataset, "loss.name": args.loss,
                             "train.batch_size": args.batch_size, "train.steps": args.steps,
                             "train.log_every": args.window, "train.ckpt_every": args.ckpt_every,
                             "train.cpus_per_worker": args.threads, "train.use_gpu": False})
    with tempfile.TemporaryDirectory() as tmp:
        plain_a = plain_loop(cfg, args.steps, args.window)
        ray_1, ray_1_e2e = ray_loop(cfg, args.steps, args.window, 1, tmp)
        plain_b = plain_loop(cfg, args.steps, args.window)
        ray_2 = None
        if args.two_workers:
            two = replace(cfg, {"train.cpus_per_worker": max(1, args.threads // 2)})
            ray_2, ray_2_e2e = ray_loop(two, args.steps, args.window, 2, tmp)
        ray.shutdown()  # the 2-node cluster gets the machine to itself
        nodes = cluster_loop(cfg, tmp) if args.cluster else None
    plain = (plain_a + plain_b) / 2
    result = {"plain_images_per_s": round(plain, 1), "plain_runs": [round(plain_a, 1), round(plain_b, 1)],
              "ray_1_worker_images_per_s": round(ray_1, 1), "ratio_ray_1_worker_vs_plain": round(ray_1 / plain, 3),
              "ray_1_worker_end_to_end_images_per_s": round(ray_1_e2e, 1),
              "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps, "loss": args.loss,
              "ckpt_every": args.ckpt_every}
    if ray_2 is not None:
        result.update(ray_2_workers_images_per_s=round(ray_2, 1), ratio_2_workers_vs_1=round(ray_2 / ray_1, 3),
                      ray_2_workers_end_to_end_images_per_s=round(ray_2_e2e, 1))
    if nodes is not None:
        result.update(cluster_1_worker_images_per_s=round(nodes["window"], 1),
                      ratio_cluster_vs_plain=round(nodes["window"] / plain, 3),
                      cluster_end_to_end_images_per_s=round(nodes["e2e"], 1),
                      checkpoint_mb=nodes["checkpoint_mb"], s3_upload_s_per_mb=nodes["s3_upload_s_per_mb"],
                      local_write_s_per_mb=nodes["local_write_s_per_mb"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
