"""A fresh run that starts from another run's weights (train.init_from, `--init-from CHECKPOINT`): fine-tuning.

    aigc-ray train --dataset mnist-5k --ndf 16 --d-norm layer --no-spectral-norm --name public
    aigc-ray train --dataset fashion-mnist --dp-epsilon 10 --init-from runs/public --name private

G, D and G_ema take the checkpoint's weights; the optimisers, the step count and every random stream start
afresh. The architecture must be the same (a DP run's D is the private recipe's: train the public model
with those D settings). Under DP the checkpoint's training data must be public: epsilon covers this run's
fine-tuning only, and every statement of it says so; a checkpoint trained on this run's own images is
refused, since epsilon would not cover that training.
"""

from __future__ import annotations

import json
from typing import Any

from . import checkpoint as ckpt
from . import storage
from .config import Config, ConfigError, same_images, validate
from .gan.step import TrainState, unwrap

# What must match for the weights to fit: the networks' shapes, and what they make.
SHAPE_KEYS = ("model.arch", "model.latent_dim", "model.ngf", "model.ndf", "model.d_norm", "model.spectral_norm",
              "model.conditional", "model.num_classes", "data.image_size", "data.channels")


def _get(d: dict[str, Any], key: str):
    section, name = key.split(".")
    return d.get(section, {}).get(name)


def check_data(cfg: Config, source_cfg: Config, where: str) -> None:
    """Under DP, the starting weights must come from data apart from the private set."""
    if cfg.privacy.enabled and same_images(source_cfg.data.dataset, cfg.data.dataset):
        raise ConfigError(f"train.init_from: {where} was trained on {source_cfg.data.dataset}, the private images of "
                          f"this DP run, so epsilon would not cover that training; start from a checkpoint trained "
                          f"on public data")


def source(cfg: Config, shapes: bool = True) -> dict[str, Any] | None:
    """The checkpoint a fresh run of a resolved cfg starts from ({checkpoint, step, dataset, dp}), checked; None
    without train.init_from. One line (ConfigError) when it cannot be had, does not fit (shapes: compare the
    networks, which needs cfg resolved), or is private data."""
    if not cfg.train.init_from:
        return None
    try:  # its config and meta.json: the weights are loaded where they are used (apply)
        where = ckpt.find(cfg.train.init_from)
        theirs, meta = json.loads(storage.read_text(storage.join(where, ckpt.CONFIG_FILE))), ckpt.read_meta(where)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"train.init_from: {str(e).removeprefix('checkpoint: ')}") from None
    ours = cfg.to_dict()
    check_data(cfg, validate(Config.from_dict(theirs)), where)
    keys = [k for k in SHAPE_KEYS if shapes and (k != "model.num_classes" or cfg.model.conditional)]
    differ = [f"{k} {_get(theirs, k)} (this run: {_get(ours, k)})" for k in keys if _get(theirs, k) != _get(ours, k)]
    if differ:
        hint = " (a DP run's D is the private recipe's: train the public model with the same --ndf, --d-norm layer " \
               "and --no-spectral-norm)" if cfg.privacy.enabled else ""
        raise ConfigError(f"train.init_from: {where} has other networks: " + ", ".join(differ) + hint)
    return {"checkpoint": where, "step": int(meta["step"]), "dataset": theirs["data"]["dataset"],
            "dp": bool(meta.get("privacy"))}


def apply(state: TrainState, init: dict[str, Any], device="cpu") -> None:
    """Put the G, D and G_ema weights of source()'s checkpoint into a fresh TrainState, which then says so."""
    weights = ckpt.load(init["checkpoint"], map_location=device)
    unwrap(state.g).load_state_dict(weights["g"])
    unwrap(state.d).load_state_dict(weights["d"])
    if state.g_ema is not None:
        state.g_ema.load_state_dict(weights["g_ema"] if weights.get("g_ema") is not None else weights["g"])
    state.init_from = dict(init)
