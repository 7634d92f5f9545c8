"""The GPU check of bench/gpu_check.sh in one process and one Ray cluster: the device tests, training
images/s, standard FID time, Serve load on a GPU replica.

    python bench/gpu_bench.py --out gpu-check/            # on a GPU machine (bench/gpu_check.sh runs it)
    python bench/gpu_bench.py --out smoke/ --smoke        # the same steps, tiny, on the CPU

0. The `gpu` tests (tests/test_gpu.py) on the device, in this process and on its Ray cluster; their
   output goes to <out>/tests.txt, and a failure stops the check.
1. Training images/s of the train step at 32, 64 and 128 px (batch 256): a plain loop in fp32, AMP bf16,
   AMP fp16 (GradScaler), bf16 + channels_last, bf16 + torch.compile (64 px); then Ray Train with 1 worker
   (and one worker per GPU when there are several) in the default setting, beside the plain loop.
2. The standard FID (Inception) of 10,000 generated images against reference statistics computed (and
   timed) first, all on the GPU.
3. A Serve replica on the GPU: images/s at n=16 and n=64 under 16 concurrent clients, against the same
   forward + PNG encoding in this process (the limit).
Writes <out>/gpu_check.json and prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aigc_ray import data, metrics, train  # noqa: E402
from aigc_ray.metrics import features  # noqa: E402
from aigc_ray.config import Config, DataConfig, replace  # noqa: E402
from aigc_ray.gan.step import build_state, train_step  # noqa: E402
from aigc_ray.images import to_uint8  # noqa: E402
from aigc_ray.plan import resolve  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(device, size: int, amp: str, steps: int, batch: int, ds, channels_last=False, compiled=False) -> float:
    """Images/s of the train step in a plain loop on device (after 3 warm-up steps)."""
    cfg = resolve(replace(Config(), {"data.dataset": "mnist-5k", "data.image_size": size, "train.amp": amp,
                                     "train.batch_size": batch}), channels=1, num_classes=10, size=len(ds),
                  use_gpu=device.type == "cuda")
    cfg = replace(cfg, {"train.amp": amp})
    state = build_state(cfg, device)
    if channels_last:
        state.g.to(memory_format=torch.channels_last)
        state.d.to(memory_format=torch.channels_last)
    if compiled:
        state.g, state.d = torch.compile(state.g), torch.compile(state.d)
    batches = data.Batches(ds, batch, seed=0, device=device)
    for _ in range(3):
        train_step(state, batches, cfg)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stats = train_step(state, batches, cfg)
    _sync(device)
    if not all(torch.isfinite(v).all() for v in stats.values()):
        raise SystemExit(f"non-finite losses at {size}px {amp}: {stats}")
    return steps * batch / (time.perf_counter() - t0)


def ray_train(size: int, steps: int, batch: int, workers: int, use_gpu: bool, root: str) -> tuple[float, str]:
    """Median images/s of a Ray Train run (workers x GPU) over its report windows after the first, from its
    TensorBoard events; and its checkpoint. The windows tile the run, report calls and checkpoints included."""
    from train_throughput import rates

    cfg = replace(Config(), {"data.dataset": "mnist-5k", "data.image_size": size, "train.batch_size": batch,
                             "train.steps": steps, "train.log_every": min(50, steps),
                             "train.ckpt_every": steps,
                             "train.num_workers": workers, "train.use_gpu": use_gpu,
                             "run.storage": root, "run.name": f"gpu-{size}-{workers}w"})
    out = train.fit(cfg, quiet=True)
    return rates(out["run_dir"])[0], out["checkpoint"]  # (a smoke run's one report is its only window)


def fid_time(device, n: int, checkpoint: str, ref_images: int = 5000) -> dict:
    """Seconds for the reference statistics of mnist-5k (its first ref_images) and for the FID of n generated
    images, on device."""
    from aigc_ray.checkpoint import load_generator
    from aigc_ray.seeds import noise

    inception = features.Inception(device=device, batch=250 if device.type == "cuda" else 25)
    real = data.load(DataConfig(dataset="mnist-5k")).images[:ref_images]
    _sync(device)
    t0 = time.perf_counter()
    ref = metrics.FeatureStats(2048).add(inception(real))
    _sync(device)
    t_ref = time.perf_counter() - t0
    g, cfg, _ = load_generator(checkpoint, device)
    t0 = time.perf_counter()
    gen = torch.cat([to_uint8(g(noise(min(1000, n - i), cfg.model.latent_dim, seed=i, device=device)))
                     for i in range(0, n, 1000)])
    value = metrics.fid_from_stats(metrics.FeatureStats(2048).add(inception(gen)), ref)
    _sync(device)
    return {"reference_images": len(real), "reference_s": round(t_ref, 2), "samples": n,
            "fid_s": round(time.perf_counter() - t0, 2), "fid": round(value, 2)}


def serve_load(checkpoint: str, use_gpu: bool, seconds: float, clients: int = 16) -> dict:
    """images/s of one Serve replica (on the GPU) at n=16 and n=64, and the in-process limit. Serve stays up
    until the cluster goes."""
    import httpx
    from ray import serve

    from aigc_ray.images import grid, png_bytes
    from aigc_ray.serve import Sampler, ServeArgs, build_app

    out = {}
    sampler = Sampler(checkpoint)
    for n in (16, 64):
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 2:
            x = sampler.forward(sampler.noise(list(range(done, done + n)), None))
            png_bytes(grid(torch.from_numpy(x).permute(0, 3, 1, 2)))
            done += n
        out[f"limit_n{n}"] = done / (time.perf_counter() - t0)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(ServeArgs(checkpoint=checkpoint, max_n=64), num_cpus=1, num_gpus=1 if use_gpu else 0),
              name="gpu", route_prefix="/")  # left to the ray.shutdown() at the end (serve.shutdown(): 2.3 s)
    for n in (16, 64):
        images, stop = [0], time.perf_counter() + seconds

        def client(seed: int):
            with httpx.Client(base_url="http://127.0.0.1:8000", timeout=60) as c:
                while time.perf_counter() < stop:
                    if c.post("/generate", json={"n": n, "seed": seed, "format": "grid"}).status_code == 200:
                        images[0] += n
                    seed += n

        threads = [threading.Thread(target=client, args=(i * 10**6,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[f"serve_n{n}"] = images[0] / (time.perf_counter() - t0)
        out[f"ratio_n{n}"] = out[f"serve_n{n}"] / out[f"limit_n{n}"]
    return {k: round(v, 3 if k.startswith("ratio") else 1) for k, v in out.items()}


def device_tests(device: str, out_dir: Path) -> dict:
    """Runs tests/test_gpu.py on device in this process (the Ray cluster already started is theirs too);
    writes their output to out_dir/tests.txt and returns the outcome counts."""
    import io
    from collections import Counter

    import pytest

    class Outcomes:
        def __init__(self):
            self.counts: Counter = Counter()

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                self.counts[report.outcome] += 1

    os.environ["AIGC_RAY_DEVICE"] = device
    outcomes, text = Outcomes(), io.StringIO()
    root = Path(__file__).resolve().parents[1]
    # On the CPU, the two-replica test is test_serve's replica-loss test already (a Serve start and two
    # replicas: ~13 s of the smoke run).
    only = ["-k", "not two_replicas"] if device == "cpu" else []
    with contextlib.redirect_stdout(text):
        code = pytest.main(["-q", "-s", "-m", "gpu", *only, str(root / "tests" / "test_gpu.py"), "-p",
                            "no:cacheprovider", "--rootdir", str(root)], plugins=[outcomes])
    (out_dir / "tests.txt").write_text(text.getvalue())
    print("\n".join(text.getvalue().rstrip().splitlines()[-3:]), flush=True)
    if code != 0 or not outcomes.counts["passed"] or set(outcomes.counts) != {"passed"}:
        raise SystemExit(f"gpu_check: the device tests did not all pass ({dict(outcomes.counts)}); "
                         f"see {out_dir / 'tests.txt'}")
    return dict(outcomes.counts)


class Phases(dict):
    """Seconds per step of the check: `with phases("fid"): ...`."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - t0, 1)


def main() -> None:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: check the script works")
    args = p.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    sizes, steps, batch = ([32, 64, 128], 30, 256) if gpu else ([32], 2, 8)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if gpu else "cpu (smoke)",
                    "gpus": torch.cuda.device_count() if gpu else 0, "training": [], "smoke": not gpu}
    print(f"[gpu_check] torch {torch.__version__}, CUDA {torch.version.cuda}, {report['device']} x{report['gpus']}",
          flush=True)
    import ray

    phases = report["seconds"] = Phases()
    # One cluster for everything: the device tests, Ray Train and Serve (a second one costs ~10 s).
    with phases("ray_init"):
        ray.init(address="local", logging_level="WARNING", num_gpus=torch.cuda.device_count() if gpu else 0)
    with phases("device_tests"):
        report["tests"] = device_tests(device.type, out_dir)
    with phases("training"):
        for size in sizes:
            dsz = data.load(DataConfig(dataset="mnist-5k", image_size=size))
            row = {"size": size}
            for name, amp, kw in (("fp32", "none", {}), ("bf16", "bf16", {}), ("fp16", "fp16", {}),
                                  ("bf16+channels_last", "bf16", {"channels_last": True})):
                row[name] = round(plain(device, size, amp, steps, batch, dsz, **kw), 1)
            if gpu and size == 64:
                try:
                    row["bf16+compile"] = round(plain(device, size, "bf16", steps, batch, dsz, compiled=True), 1)
                except Exception as e:  # compile is an option, not a requirement: say why it is missing
                    row["bf16+compile"] = f"failed: {type(e).__name__}"
            report["training"].append(row)
            print(f"[gpu_check] {json.dumps(row)}", flush=True)

    root = tempfile.mkdtemp(prefix="gpu_check_")
    size = 64 if gpu else 32
    plain_rate = plain(device, size, "bf16" if gpu else "none", steps, batch,
                       data.load(DataConfig(dataset="mnist-5k", image_size=size)))
    # ~15 s of training on a GPU: several reports (one per REPORT_EVERY_S) to take the median of
    ray_steps = int(min(5000, max(200, 15 * plain_rate / batch))) if gpu else 2
    with phases("ray_train"):
        rate, checkpoint = ray_train(size, ray_steps, batch, 1, gpu, root)
    report["ray_train"] = {"size": size, "workers": 1, "steps": ray_steps, "images_per_s": round(rate, 1),
                           "plain_images_per_s": round(plain_rate, 1), "ratio": round(rate / plain_rate, 3)}
    if gpu and torch.cuda.device_count() > 1:
        n = torch.cuda.device_count()
        report["ray_train"][f"{n}_workers_images_per_s"] = round(ray_train(size, ray_steps, batch, n, True, root)[0], 1)
    print(f"[gpu_check] ray_train {json.dumps(report['ray_train'])}", flush=True)
    with phases("fid"):
        report["fid"] = fid_time(device, 10000 if gpu else 16, checkpoint, 5000 if gpu else 16)
    print(f"[gpu_check] fid {json.dumps(report['fid'])}", flush=True)
    with phases("serve"):
        report["serve"] = serve_load(checkpoint, gpu, 10 if gpu else 0.5, clients=16 if gpu else 2)
    print(f"[gpu_check] serve {json.dumps(report['serve'])}", flush=True)
    with phases("ray_shutdown"):
        ray.shutdown()
    phases["total"] = round(time.perf_counter() - t_start, 1)

    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"\n| check ({report['device']}) | figure |\n|---|---|")
    print(f"| device tests (tests/test_gpu.py) | " + ", ".join(f"{v} {k}" for k, v in report["tests"].items()) + " |")
    for row in report["training"]:
        print(f"| train step {row['size']} px, images/s | " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "size")
              + " |")
    rt = report["ray_train"]
    print(f"| Ray Train 1 worker vs plain loop ({rt['size']} px) | {rt['images_per_s']} vs {rt['plain_images_per_s']} "
          f"images/s ({rt['ratio']}) |")
    f = report["fid"]
    print(f"| standard FID of {f['samples']} samples | {f['fid_s']} s (reference of {f['reference_images']} images: "
          f"{f['reference_s']} s) |")
    s = report["serve"]
    print(f"| Serve replica n=16 / n=64, images/s | {s['serve_n16']} / {s['serve_n64']} (limit {s['limit_n16']} / "
          f"{s['limit_n64']}; {s['ratio_n16']} / {s['ratio_n64']}) |")
    print("| wall time, s | " + ", ".join(f"{k} {v}" for k, v in phases.items()) + " |")
    print(f"\nwritten: {out_dir / 'gpu_check.json'}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
