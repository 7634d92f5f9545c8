"""The sections of a config: typed, frozen dataclasses whose fields hold every default and its help, and the
vocabulary (loss names, datasets, augmentations) other modules implement."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

IMAGE_SIZES = (32, 64, 128)
LOSSES = ("bce", "wgan-gp", "hinge", "lsgan")
D_NORMS = ("auto", "batch", "layer", "none")
ARCHS = ("dcgan", "resnet")
AMP_MODES = ("auto", "none", "bf16", "fp16")
METRICS = ("fid-domain", "fid")
DATASETS = ("fashion-mnist", "mnist-5k", "mnist", "cifar10", "celeba", "orl-faces")  # aigc_ray.data loads each; folder:PATH
AUGMENTATIONS = ("color", "translation", "cutout")  # gan/augment.py implements each


class ConfigError(ValueError):
    """A config value a user gave is wrong; the message names the field and what is allowed."""


class RunError(RuntimeError):
    """A run failed for real (not a user mistake); the message says what stands and how to go on."""


def opt(default: Any, help: str, *, flag: str | None = None):
    """A config field: its default, the comment shown by `--help`, and (rarely) a flag name of its own."""
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("fashion-mnist", "fashion-mnist | mnist-5k | mnist | cifar10 | celeba | folder:PATH")
    image_size: int = opt(32, "side of the square images the GAN makes: 32, 64 or 128")
    channels: int = opt(0, "1 (grayscale) or 3 (RGB); 0: the dataset's own")
    root: str = opt("", "where torchvision datasets are kept or downloaded to; '': ~/.cache/aigc_ray/data")
    download: bool = opt(True, "let torchvision download a dataset that is not under root (needs network)")
    limit: int = opt(0, "train on the first N training images only (few-shot; the test split stays whole); 0: all")
    face_crop: bool = opt(False, "folder datasets: crop each photo to its largest face (OpenCV Haar cascade), square "
                                 "with a margin, eyes level; photos without a face are skipped and counted")
    cache: str = opt("", "folder or URI caching decoded images, domain classifiers and FID references; "
                         "'': $AIGC_RAY_CACHE, else <storage>/.cache for remote storage, else ~/.cache/aigc_ray")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = opt("dcgan", "dcgan (transposed convolutions) | resnet (SNGAN-style residual blocks)")
    latent_dim: int = opt(128, "size of the noise vector z fed to G")
    ngf: int = opt(64, "G width: channels of G's last hidden layer (doubling towards the 4x4 start)")
    ndf: int = opt(0, "D width: channels of D's first layer (doubling towards the 4x4 end); 0: 64, or the private "
                      "recipe's under DP")
    d_norm: str = opt("auto", "D normalisation: batch | layer | none; auto: none with wgan-gp, resnet or "
                              "spectral_norm, else batch")
    spectral_norm: bool = opt(True, "spectral normalisation on every D layer (and then no BatchNorm in D)")
    conditional: bool | None = opt(None, "class-conditional G (label embedding) and D (projection); needs labels; "
                                         "unset: on for datasets of people (orl-faces, a folder with one subfolder "
                                         "per person), else off")
    num_classes: int = opt(0, "classes of a conditional model; 0: the dataset's own")
    class_names: tuple = opt((), "names of the classes in label order (filled from the dataset: a labeled "
                                 "folder's subfolders); --class takes a name or an index")


@dataclass(frozen=True)
class LossConfig:
    name: str = opt("bce", "bce (non-saturating DCGAN) | wgan-gp | hinge | lsgan", flag="--loss")
    gp_weight: float = opt(10.0, "lambda of the WGAN-GP gradient penalty")
    n_critic: int = opt(0, "D updates per G update; 0: 5 for wgan-gp, the private recipe's under DP, 1 otherwise")
    r1_weight: float = opt(0.0, "gamma of the R1 penalty gamma/2 E||grad D(real)||^2 (lazy: every 16 D steps); 0: off")


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = opt(3e-4, "Adam learning rate of G")
    lr_d: float = opt(2e-4, "Adam learning rate of D")
    beta1: float = opt(0.0, "Adam beta1 (both networks)")
    beta2: float = opt(0.999, "Adam beta2 (both networks)")


@dataclass(frozen=True)
class AugmentConfig:
    policy: str = opt("auto", "DiffAugment of D's real and fake images: none, or a comma list of color, translation, "
                              "cutout; auto: translation,cutout below augment.below training images, else none",
                      flag="--augment")
    below: int = opt(10000, "policy auto augments datasets with fewer training images than this",
                     flag="--augment-below")
    p: float = opt(1.0, "probability that each augmentation is applied to an image (the start, when adaptive)",
                   flag="--aug-p")
    adaptive: bool = opt(False, "adapt p to D's overfitting (ADA's r_t heuristic)", flag="--ada")
    target: float = opt(0.6, "the r_t = E[sign(D(real))] that adaptive p keeps", flag="--ada-target")
    speed: int = opt(100000, "images over which adaptive p may move by 1", flag="--ada-speed")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = opt(2000, "G updates to train for (the run's total, also when resuming)")
    batch_size: int = opt(0, "images per worker per D update (under DP: expected, Poisson); the global batch is "
                             "batch_size x num_workers; 0: 64, or the private recipe's under DP")
    num_workers: int = opt(-1, "Ray Train workers (data-parallel DDP); -1: auto (one per GPU, else one per "
                               "node); 0: run in this process, no workers")
    use_gpu: bool | None = opt(None, "train on GPUs; None: when the cluster has them", flag="--use-gpu")
    amp: str = opt("auto", "autocast on GPU: none | bf16 | fp16; auto: bf16 on GPU, none on CPU")
    cpus_per_worker: int = opt(0, "CPUs Ray reserves for each worker, and its torch threads; 0: auto (the "
                                  "cluster's CPUs split among the workers)")
    ema_decay: float = opt(0.99, "decay of the EMA copy of G used for samples and FID; 0: no EMA")
    log_every: int = opt(50, "report metrics every this many steps (Ray Train workers: at most once per 2.5 s)")
    ckpt_every: int = opt(500, "write a checkpoint (with a sample grid) every this many steps")
    keep_checkpoints: int = opt(3, "checkpoints kept per run (the newest); 0: keep all")
    eval_every: int = opt(0, "compute eval_metric every this many steps (at checkpoints); 0: off")
    eval_metric: str = opt("fid-domain", "metric computed during training: fid-domain | fid")
    eval_samples: int = opt(2000, "generated images for the metric during training")
    eval_dataset: str = opt("", "dataset whose test split (and domain classifier) scores the run; '': the training "
                                "dataset's own. A DP run is scored only on data outside its private set: name a "
                                "public one here (e.g. fashion-mnist for a private Fashion-MNIST subset)")
    init_from: str = opt("", "a checkpoint (or run folder) whose G, D and G_ema weights start a fresh run: "
                             "fine-tuning, e.g. from a model of public data. The same networks are needed; under "
                             "DP its data must not be this run's, and epsilon covers the fine-tuning only")
    max_failures: int = opt(3, "worker-group restarts from the last checkpoint before the run fails")
    seed: int = opt(0, "seed of weights, noise, data order and the fixed sample-grid noise")


@dataclass(frozen=True)
class PrivacyConfig:
    noise_multiplier: float | None = opt(None, "DP-SGD on D (Opacus): Gaussian noise std / max_grad_norm (sigma); "
                                               "unset: no DP, unless privacy.epsilon", flag="--dp-noise-multiplier")
    max_grad_norm: float = opt(1.0, "DP-SGD: each training image's gradient of D is clipped to this L2 norm (C)",
                               flag="--dp-max-grad-norm")
    epsilon: float | None = opt(None, "DP: the epsilon to spend; alone, sigma is solved so train.steps spend it; "
                                      "with a noise multiplier, training stops before it is passed",
                                flag="--dp-epsilon")
    delta: float = opt(1e-5, "DP: the delta of (epsilon, delta); must be < 1 / training images", flag="--dp-delta")
    max_physical_batch: int = opt(512, "DP: the most images (real and fake) D takes in one forward and backward; a "
                                       "larger Poisson batch is split, its pieces' clipped gradients summed before "
                                       "the one noisy step (Opacus' BatchMemoryManager), so memory stays bounded",
                                  flag="--dp-max-physical-batch")

    @property
    def enabled(self) -> bool:
        """DP is on when a noise multiplier or an epsilon is given."""
        return self.noise_multiplier is not None or self.epsilon is not None


@dataclass(frozen=True)
class RunConfig:
    name: str = opt("", "run name; running the same name again resumes it; '': dataset-loss-time")
    storage: str = opt(os.environ.get("AIGC_RAY_STORAGE") or "~/aigc_ray/runs",
                       "where runs, searches, reports and caches live: a folder, an NFS mount or an object store "
                       "URI (s3://bucket/prefix, gs://...); default $AIGC_RAY_STORAGE (cluster.yaml sets it), "
                       "else ~/aigc_ray/runs")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a nested dict; unknown sections or keys are errors, missing ones take defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {type(d).__name__}")
        sections = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; allowed: {sorted(sections)}")
        return replace(cls(), {f"{s}.{k}": v for s, sub in d.items() for k, v in _as_mapping(s, sub).items()})

    def get(self, key: str) -> Any:
        section, name = _split_key(key)
        return getattr(getattr(self, section), name)


def _as_mapping(section: str, sub: Any) -> dict:
    if sub is None:
        return {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{section}: expected a mapping, got {sub!r}")
    return sub


def section_classes() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config)}


def all_keys() -> dict[str, dataclasses.Field]:
    """Every config key as 'section.field' -> its dataclass field."""
    return {f"{s}.{f.name}": f for s, cls in section_classes().items() for f in fields(cls)}


def _split_key(key: str) -> tuple[str, str]:
    if key.count(".") != 1 or key not in all_keys():
        raise ConfigError(f"unknown config key {key!r}; keys look like 'optim.lr_g' (see `aigc-ray train --help`)")
    section, name = key.split(".")
    return section, name


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Type-check one value against its field (ints stay ints, YAML's 1e-4 strings become floats)."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{key}: must not be empty")
    kind = kind.replace(" | None", "")
    if kind == "tuple":  # a list of names: JSON/YAML lists, or one comma-separated string from a flag
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{key}: must be a list of names, got {value!r}")
        return tuple(v.strip() for v in items if v.strip())
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?\d+", value))):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return int(value)
    if kind == "float":
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a number, got {value!r}") from None
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled field type {kind} for {key}")


def replace(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of cfg with 'section.field' keys set (type-checked, not yet validated)."""
    keys = all_keys()
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = _split_key(key)
        by_section.setdefault(section, {})[name] = _coerce(key, keys[key], value)
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in by_section.items()}
    )
