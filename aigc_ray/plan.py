"""Planning a run: its 'auto' values made concrete from the data (resolve), and its workers and threads fitted
to the cluster's alive nodes (plan_workers), for Ray Train and for every trial of a Tune search alike."""

from __future__ import annotations

import os
import time

import ray

from . import privacy
from .config import Config, ConfigError, replace, validate, with_cache


def resolve(cfg: Config, *, channels: int, num_classes: int, use_gpu: bool = False, size: int = 0,
            spent: list | None = None, class_names: list[str] | None = None, people: bool = False) -> Config:
    """Make every 'auto' value concrete, given what the dataset (size: training images, its class names, whether
    its labels are people) and cluster are; spent: the DP accountant history of a resumed checkpoint."""
    cfg = with_cache(cfg)
    if size:  # DP first: it picks D's normalisation, and sigma or the last step from epsilon
        cfg = replace(cfg, privacy.resolved(cfg, size, spent))
    lo, m, t, d = cfg.loss, cfg.model, cfg.train, cfg.data
    conditional = m.conditional if m.conditional is not None else (people and num_classes >= 2)
    if conditional and num_classes <= 0:
        raise ConfigError(f"model.conditional: dataset {d.dataset!r} has no labels; drop --conditional")
    if conditional and num_classes < 2 and not m.num_classes:
        raise ConfigError(f"model.conditional: {d.dataset} has one class (one subfolder); a conditional model needs "
                          "at least 2 people (one subfolder each), or train it with --no-conditional")
    overrides = {
        "data.channels": d.channels or channels,
        "model.d_norm": m.d_norm if m.d_norm != "auto" else (
            "none" if lo.name == "wgan-gp" or m.arch == "resnet" or m.spectral_norm else "batch"),
        "model.conditional": bool(conditional),
        "model.num_classes": (m.num_classes or num_classes) if conditional else 0,
        "model.class_names": (m.class_names or tuple(class_names or ())) if conditional else (),
        "loss.n_critic": lo.n_critic or (5 if lo.name == "wgan-gp" else 1),
        "train.batch_size": t.batch_size or 64,
        "model.ndf": m.ndf or 64,
        "train.amp": t.amp if t.amp != "auto" else ("bf16" if use_gpu else "none"),
        "augment.policy": cfg.augment.policy if cfg.augment.policy != "auto" else (
            "translation,cutout" if 0 < size < cfg.augment.below else "none"),
        "train.use_gpu": bool(use_gpu),
        "run.name": cfg.run.name or f"{d.dataset.split(':')[0]}-{lo.name}-{time.strftime('%Y%m%d-%H%M%S')}",
    }
    return validate(replace(cfg, overrides))


def plan_workers(num_workers: int, cpus_per_worker: int, use_gpu: bool, nodes: list[dict[str, float]],
                 concurrent: int = 1) -> tuple[int, int]:
    """Concrete (workers, CPUs per worker) for 'auto' values (-1 workers, 0 CPUs), for `concurrent` runs
    sharing the cluster whose alive nodes hold `nodes` resources ({"CPU": 2, "GPU": 0}).

    Auto workers: one per GPU on GPUs, else one per node with CPUs (inside a node, torch threads beat
    DDP between processes). Auto CPUs: the most per worker such that every worker of every run still
    fits on some node, so Ray never waits for a placement the cluster cannot give.
    """
    concurrent = max(1, concurrent)
    cpu_nodes = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1]
    if num_workers < 0:
        gpus = int(sum(n.get("GPU", 0) for n in nodes))
        num_workers = max(1, (gpus if use_gpu and gpus else len(cpu_nodes)) // concurrent)
    if cpus_per_worker <= 0:
        need = num_workers * concurrent
        fits = [c for c in range(1, max(cpu_nodes, default=1) + 1) if sum(n // c for n in cpu_nodes) >= need]
        cpus_per_worker = max(fits, default=1)
    return num_workers, cpus_per_worker


def layout(cfg: Config) -> str:
    """How a resolved run uses the machine, as the progress lines say it: '1 worker x 2 threads'."""
    t = cfg.train
    workers = "in-process" if t.num_workers == 0 else f"{t.num_workers} worker{'s' * (t.num_workers > 1)}"
    return f"{workers} x {t.cpus_per_worker} thread{'s' * (t.cpus_per_worker > 1)}" + (" + GPU" if t.use_gpu else "")


def alive_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_cluster(cfg: Config) -> None:
    """Ask for no more workers than the cluster can ever place: Ray would wait for them forever."""
    t = cfg.train
    if t.num_workers == 0:
        return
    res = ray.cluster_resources()
    need, have = t.num_workers * t.cpus_per_worker, res.get("CPU", 0)
    autoscaling = bool(os.environ.get("AIGC_RAY_AUTOSCALING"))
    if need > have and not autoscaling:
        raise ConfigError(f"train.num_workers: {t.num_workers} workers x {t.cpus_per_worker} CPUs need {need:g} "
                          f"CPUs, the cluster has {have:g}; lower --num-workers (or set AIGC_RAY_AUTOSCALING=1 "
                          "on an autoscaling cluster)")
    if t.use_gpu and t.num_workers > res.get("GPU", 0) and not autoscaling:
        raise ConfigError(f"train.use_gpu: {t.num_workers} GPU workers, the cluster has {res.get('GPU', 0):g} GPUs")

