"""Does a generator copy its training images? A memorization audit of a checkpoint.

    aigc-ray audit --checkpoint runs/demo --num-samples 2000 --json

For every sample, the cosine distance (in the domain classifier's features where the dataset has labels,
else Inception's; --features picks) to its nearest training image; for held-out real images (never trained
on), the same distance. A held-out image is a new picture from the same source, so its distance is what "close
but not a copy" looks like. Reported:
- copy rate: the share of samples closer to a training image than the 1st percentile of held-out
  images are (a generator that makes new images scores ~0.01, one that replays its training set ~1);
- MiFID (Kaggle's "Generative Dog Images" competition): FID against the training images, divided by the
  mean nearest-training distance of the samples when that is below 0.1 (else by 1), so copying is penalised;
- audit_pairs.png: the closest samples beside their nearest training images, for the owner to look at; never
  for a DP run, whose audit reports numbers only (a picture of a training image is no DP release).

Held-out images: the training split beyond data.limit when the run used --limit, else the test split.
A folder (or mnist-5k) trained whole has none: train with --limit N to keep images back.

Why not always Inception: at 32 px, Inception's features are dominated by texture. Grey-level noise of
+-8 on a real digit moves it 0.077 in cosine distance, as far as a different digit is (0.079), so a GAN's
near-exact copies (which carry such noise) sat at 0.20 from their training images while held-out digits
sat at 0.05: copy rate 0.00 for a model that replays 8 training zeros. The domain classifier, trained on
the dataset's own images, gave the same model a copy rate of 0.57 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch

from . import data, storage
from .checkpoint import find, load_generator
from .images import grid, png_bytes
from .config import ConfigError, DataConfig, replace
from .metrics import FeatureStats, has_labels, compute, fid_from_stats, generated_images, reference

PERCENTILE = 1.0  # held-out images closer than this percentile count as "as close as a real new image gets"
MIFID_EPS = 0.1  # Kaggle's cosine-distance threshold
FEATURES = ("auto", "inception", "domain")
PRIVATE_NOTE = ("DP run: numbers only, no training image is written; these numbers are computed on the training "
                "images and are not covered by the run's epsilon")
PAIRS_NOTE = "audit_pairs.png shows training photos beside the samples: keep it private"


def nearest(query: torch.Tensor, ref: torch.Tensor, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distance from each query feature to its nearest ref feature, and that ref's index."""
    q = torch.nn.functional.normalize(query.float(), dim=1)
    r = torch.nn.functional.normalize(ref.float(), dim=1)
    dists, idx = [], []
    for i in range(0, len(q), batch):
        sim, j = (q[i:i + batch] @ r.T).max(1)
        dists.append((1 - sim).clamp_(min=0))
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


def copy_rate(d_samples: torch.Tensor, d_heldout: torch.Tensor, percentile: float = PERCENTILE) -> tuple[float, float]:
    """(share of samples nearer a training image than the percentile of held-out images, that threshold)."""
    threshold = float(torch.quantile(d_heldout.double(), percentile / 100))
    return float((d_samples.double() < threshold).double().mean()), threshold


def mifid(fid: float, d_samples: torch.Tensor, eps: float = MIFID_EPS) -> float:
    """FID / d_thr, d_thr = mean nearest-training distance if below eps, else 1 (Kaggle's MiFID)."""
    d = float(d_samples.double().mean())
    return fid / ((d if d < eps else 1.0) + 1e-15)


def heldout_images(d: DataConfig, n: int) -> tuple[torch.Tensor, str]:
    """Up to n real images the run never trained on, and where they come from."""
    whole = dataclasses.replace(d, limit=0)
    if d.limit and data.size(whole) > d.limit:
        rest = data.load(whole, "train").images[d.limit:d.limit + n]
        return rest, f"training split images {d.limit}..{d.limit + len(rest) - 1} (beyond --limit)"
    if d.dataset.startswith("folder:") or d.dataset == "mnist-5k":
        raise ConfigError(f"audit: {d.dataset} was trained on whole, so no image was held out to compare with; "
                          "train with --limit N to keep the images beyond N back")
    return data.load(d, "test").images[:n], "test split"


def choose_features(features: str, d: DataConfig) -> str:
    """auto: the domain classifier where the dataset has labels to train one on, else Inception."""
    if features not in FEATURES:
        raise ConfigError(f"--features: must be one of {', '.join(FEATURES)}, got {features!r}")
    if features != "auto":
        if features == "domain" and not has_labels(d):
            raise ConfigError(f"--features domain: {d.dataset} has no labels to train a domain classifier on; "
                              "use inception")
        return features
    return "domain" if has_labels(d) else "inception"


def run(checkpoint: str, *, num_samples: int = 1000, heldout: int = 1000, features: str = "auto",
        dataset: str | None = None, seed: int = 0, out: str | None = None, num_workers: int = 0,
        pairs: int = 16) -> dict[str, Any]:
    """Audit a checkpoint's G_ema against its training images; writes audit.json and audit_pairs.png."""

    if num_samples < 2 or heldout < 2:
        raise ConfigError(f"audit: --num-samples and --heldout must be >= 2, got {num_samples} and {heldout}")
    path = str(find(checkpoint))
    g, cfg, meta = load_generator(path)
    d = cfg.data if not dataset else replace(cfg, {"data.dataset": dataset, "data.limit": 0}).data
    t0 = time.time()
    train_set = data.load(d, "train")
    held, held_from = heldout_images(d, heldout)
    kind = choose_features(features, d)
    metric = "fid" if kind == "inception" else "fid-domain"
    with torch.no_grad():
        samples = generated_images(g, cfg, num_samples, seed)
    train_ref = reference(d, "train", metric, num_workers, log=lambda *a: None)  # cached: the training set once
    f_train = train_ref["features"]
    f_samples = compute({"images": samples}, metric, d, "features", num_workers)
    f_held = compute({"images": held}, metric, d, "features", num_workers)
    d_samples, nn_samples = nearest(f_samples, f_train)
    d_held, _ = nearest(f_held, f_train)
    rate, threshold = copy_rate(d_samples, d_held)
    fid = fid_from_stats(FeatureStats(f_samples.shape[1]).add(f_samples), train_ref["stats"])
    result = {
        "checkpoint": path, "step": meta["step"], "dataset": d.dataset, "features": kind,
        "num_samples": num_samples, "training_images": len(train_set), "heldout_images": len(held),
        "heldout_from": held_from, "copy_rate": rate, "threshold": threshold, "percentile": PERCENTILE,
        "mean_nearest_distance": float(d_samples.mean()), "heldout_mean_nearest_distance": float(d_held.mean()),
        "fid_vs_train": fid, "mifid": mifid(fid, d_samples), "mifid_eps": MIFID_EPS,
        "privacy": meta.get("privacy"),
    }
    out = out or storage.join(storage.parent(path), "audit", f"step{meta['step']:08d}")
    if meta.get("privacy"):  # a DP run writes nothing that shows a training image: numbers only
        result["pairs_png"] = None
        result["note"] = PRIVATE_NOTE
    else:  # the owner's tool: the closest samples beside their nearest training images (training photos!)
        order = torch.argsort(d_samples)[:pairs]
        side_by_side = torch.stack([torch.stack([samples[i], train_set.images[nn_samples[i]]]) for i in order])
        png = png_bytes(grid(side_by_side.flatten(0, 1), nrow=8))
        result["pairs_png"] = storage.write_bytes(storage.join(out, "audit_pairs.png"), png)
        result["note"] = PAIRS_NOTE
    result["seconds"] = round(time.time() - t0, 1)
    result["json"] = storage.join(out, "audit.json")
    storage.write_text(result["json"], json.dumps(result, indent=2))  # last: its presence means complete
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """What best.json, /info and the report carry of an audit."""
    keys = ("copy_rate", "mifid", "features", "num_samples", "threshold", "heldout_from", "json", "pairs_png", "note")
    return {k: result[k] for k in keys}
