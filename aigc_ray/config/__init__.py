"""One typed, frozen config for everything aigc_ray does.

Defaults live here and nowhere else. The CLI flags, the Tune search space keys ("optim.lr_g") and the
Serve options are views of these fields. A config is validated once, at the edge (`validate`), and
aigc_ray.plan.resolve turns the "auto" values into concrete ones so the copy saved with a run describes it fully.

    cfg = load_config("my.yaml", overrides={"optim.lr_g": 1e-4})
    cfg = plan.resolve(validate(cfg), channels=1, num_classes=10)

The ground floor: config imports nothing else of aigc_ray. Names other modules implement (datasets, losses,
augmentations) are vocabulary here, and every rule about values lives in checks.validate.
The parts: sections (the dataclasses, defaults and vocabulary) and checks (validate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .checks import (MAX_SEED, cache_root, check_dataset, check_run_name, parse_policy, same_images, validate,
                     with_cache)
from .sections import (AMP_MODES, ARCHS, AUGMENTATIONS, D_NORMS, DATASETS, IMAGE_SIZES, LOSSES, METRICS,
                       AugmentConfig, Config, ConfigError, DataConfig, LossConfig, ModelConfig, OptimConfig,
                       PrivacyConfig, RunConfig, RunError, TrainConfig, all_keys, opt, replace, section_classes)

__all__ = ["AMP_MODES", "ARCHS", "AUGMENTATIONS", "D_NORMS", "DATASETS", "IMAGE_SIZES", "LOSSES", "METRICS",
           "MAX_SEED", "AugmentConfig", "Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig",
           "OptimConfig", "PrivacyConfig", "RunConfig", "RunError", "TrainConfig", "all_keys", "cache_root",
           "check_dataset", "check_run_name", "load_config", "opt", "parse_policy", "replace", "same_images",
           "section_classes", "validate", "with_cache"]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then a YAML/JSON file, then overrides (CLI flags); validated."""
    cfg = Config()
    if path:
        try:
            p = Path(path).expanduser()
            found = p.is_file()
        except (OSError, ValueError):  # a name too long, a NUL byte: no such file either
            found = False
        if not found:
            raise ConfigError(f"config file not found: {str(path)[:200]!r}")
        try:
            text = p.read_text()
            if p.suffix == ".json":
                raw = json.loads(text)
            else:
                raw = yaml.safe_load(text) or {}
        except Exception as e:  # a syntax error in the user's file: name the file, not our stack
            raise ConfigError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
        cfg = Config.from_dict(raw)
    if overrides:
        cfg = replace(cfg, overrides)
    return validate(cfg)
