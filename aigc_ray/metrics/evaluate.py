"""Scoring: a checkpoint's G_ema against a dataset split (`aigc-ray eval`), and a run scored inside training."""

from __future__ import annotations

import dataclasses
import time

from .. import data
from ..checkpoint import find, load_generator
from ..config import Config, ConfigError, DataConfig
from ..seeds import derive
from .distances import FeatureStats, fid_from_stats, inception_score, kid, precision_recall
from .fanout import compute, generated_images, shippable, unship
from .features import extractor
from .reference import reference

METRIC_KEYS = {"fid": "fid", "fid-domain": "fid_domain", "kid": "kid", "is": "is", "precision-recall": "precision"}


def evaluate(checkpoint: str, metric: str, num_samples: int, split: str = "test", num_workers: int = 0,
             seed: int = 0, ref_images: int | None = None) -> dict:
    """One metric of a checkpoint's G_ema against a dataset split; Ray tasks when num_workers > 0."""
    if metric not in METRIC_KEYS:
        raise ConfigError(f"--metric: must be one of {', '.join(METRIC_KEYS)}, got {metric!r}")
    if num_samples < 2:
        raise ConfigError(f"--num-samples: must be >= 2, got {num_samples}")
    path = str(find(checkpoint))
    _, cfg, meta = load_generator(path)
    d = scoring_data(cfg)  # a DP run's public reference (train.eval_dataset), else its own data
    t0 = time.time()
    source = {"checkpoint": path, "n": num_samples, "seed": seed}
    out = {"metric": metric, "num_samples": num_samples, "checkpoint": path, "step": meta["step"],
           "dataset": d.dataset}
    if metric == "precision-recall":  # both feature spaces where the dataset has a domain classifier
        for feat_metric, suffix in (("fid", ""), ("fid-domain", "_domain")):
            if feat_metric == "fid-domain" and not has_labels(d):
                continue
            ref = reference(d, split, feat_metric, num_workers, max_images=ref_images)
            fake = compute(source, feat_metric, d, "features", num_workers)
            real = ref["features"][:max(len(fake), 2)] if not ref_images else ref["features"]
            p, r = precision_recall(real, fake, k=3)
            out.update({f"precision{suffix}": p, f"recall{suffix}": r})
            out[f"reference{suffix}"] = ref["path"]
        out.update(value=out["precision"], k=3)
    elif metric == "is":
        dom = extractor(metric, d)
        score, std = inception_score(compute(source, metric, d, "probs", num_workers))
        out.update(value=score, std=std, reference=f"{dom.id} ({dom.accuracy:.1%} test accuracy)")
    else:
        ref = reference(d, split, metric, num_workers, max_images=ref_images)
        if metric == "kid":
            mean, std = kid(ref["features"], compute(source, metric, d, "features", num_workers))
            out.update(value=mean, std=std)
        else:
            out.update(value=fid_from_stats(compute(source, metric, d, "stats", num_workers), ref["stats"]))
        out["reference"] = ref["path"]
        out["reference_images"] = ref["stats"].n
    out[METRIC_KEYS[metric]] = out["value"]
    out["seconds"] = round(time.time() - t0, 2)
    return out


def has_labels(d: DataConfig) -> bool:
    return not d.dataset.startswith("folder:") and data.info(d)[1] > 0


def scoring_data(cfg: Config) -> DataConfig:
    """The data a run is scored against: train.eval_dataset at the run's size and channels, else its own
    (a DP run names a public one: config.validate refuses any that overlaps its private set)."""
    if not cfg.train.eval_dataset:
        return cfg.data
    return dataclasses.replace(cfg.data, dataset=cfg.train.eval_dataset, limit=0)


def training_reference(cfg: Config, log=print) -> dict:
    """What the workers of a run need to score it, made once by the driver and shipped to them through
    Ray: the test split's reference statistics and the extractor (cached under data.cache)."""
    metric, d = cfg.train.eval_metric, scoring_data(cfg)
    ref = reference(d, "test", metric, log=log)
    return {"metric": metric, "stats": ref["stats"], "extractor": shippable(metric, d)}


def evaluate_in_training(g, cfg: Config, ref: dict, *, rank: int, world: int, device) -> dict[str, float]:
    """Inside the Ray Train loop: every worker generates its share, the stats are all-reduced."""
    images = generated_images(g, cfg, cfg.train.eval_samples, seed=derive(cfg.train.seed, "eval"), rank=rank,
                              world=world, device=device)
    feats = unship(ref["extractor"], device)(images)
    stats = FeatureStats(feats.shape[1]).add(feats).all_reduce()
    return {METRIC_KEYS[ref["metric"]]: fid_from_stats(stats, ref["stats"])}

