"""Search spaces: config keys to Ray Tune samplers, checked one clear line per mistake; the default spaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray import tune

from ..config import Config, ConfigError, all_keys, replace, validate

PBT_SPACE: dict[str, Any] = {  # --scheduler pbt's default: what a running member may change
    "optim.lr_g": {"loguniform": [5e-5, 1e-3]},
    "optim.lr_d": {"loguniform": [5e-5, 1e-3]},
    "optim.beta1": {"choice": [0.0, 0.5]},
    "train.ema_decay": {"choice": [0.99, 0.999]},
}
DEFAULT_SPACE: dict[str, Any] = {
    "optim.lr_g": {"loguniform": [5e-5, 1e-3]},
    "optim.lr_d": {"loguniform": [5e-5, 1e-3]},
    "optim.beta1": {"choice": [0.0, 0.5]},
    "optim.beta2": {"choice": [0.9, 0.999]},
    "loss.name": {"choice": ["bce", "wgan-gp", "hinge"]},
    "loss.n_critic": {"choice": [1, 2]},
    "model.ngf": {"choice": [32, 64]},
    "model.ndf": {"choice": [32, 64]},
    "model.spectral_norm": {"choice": [False, True]},
    "train.ema_decay": {"choice": [0.99, 0.999]},
    "train.batch_size": {"choice": [32, 64]},
}
KINDS = ("loguniform", "uniform", "choice", "grid", "randint")
SCHEDULERS = ("asha", "pbt", "none")
# What PBT may change in a running member: its optimiser and loss weights, never what fixes the networks.
PBT_MUTABLE = ("optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "loss.n_critic", "loss.gp_weight",
               "loss.r1_weight", "train.ema_decay")


def parse_space(space: dict[str, Any]) -> dict[str, Any]:
    """Validate a search space and turn it into Ray Tune samplers; one clear error per mistake."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("search space: must be a non-empty mapping of config keys to ranges")
    keys, out = all_keys(), {}
    for key, spec in space.items():
        if key not in keys:
            raise ConfigError(f"search space: unknown key {key!r}; keys look like 'optim.lr_g'")
        if key.startswith("run.") or key in ("train.num_workers", "train.steps", "train.use_gpu"):
            raise ConfigError(f"search space: {key} is set by the search itself, not searched")
        if key.startswith("data."):
            raise ConfigError(f"search space: {key}: every trial trains on the same data; set it with a flag")
        if not isinstance(spec, dict):
            validate(replace(Config(), {key: spec}))  # check a fixed value as a flag would be
            out[key] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"search space: {key}: give one of {', '.join(KINDS)}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space: {key}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("choice", "grid"):
            for v in args:
                validate(replace(Config(), {key: v}))
            out[key] = tune.choice(args) if kind == "choice" else tune.grid_search(args)
            continue
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            raise ConfigError(f"search space: {key}: {kind} needs [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search space: {key}: loguniform needs low > 0, got {args!r}")
        out[key] = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args)
    return out


def load_space(path: str | None) -> dict[str, Any] | None:
    """A YAML search space, or None (no file): search() then takes its scheduler's default space."""
    if not path:
        return None
    try:
        p = Path(path).expanduser()
        found = p.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        found = False
    if not found:
        raise ConfigError(f"search space: file not found: {str(path)[:200]!r}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"search space: cannot parse {p}: {str(e).splitlines()[0]}") from None


def default_space(space: dict | None, scheduler: str) -> dict:
    """The space a search explores: the one given, else PBT's (what a running member may change) or the default."""
    return space if space is not None else (PBT_SPACE if scheduler == "pbt" else DEFAULT_SPACE)

