"""The sampler a replica holds: G_ema of one checkpoint in plain PyTorch (no Ray), images by seed as seeds.py
draws them, in fixed-size chunks so no image depends on its batch mates."""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_generator, read_best
from ..config import ConfigError
from ..seeds import latents


class Sampler:
    """G_ema of one checkpoint, with what /info says about it."""

    def __init__(self, checkpoint: str | None = None, best: str | None = None, chunk: int = 16,
                 device: str | None = None):
        self.best = None
        if best:
            self.best = read_best(best)
            checkpoint = self.best["checkpoint"]
        if not checkpoint:
            raise ValueError("serve: give a checkpoint or a best.json")
        # On the GPU a replica was given (num_gpus), else the CPU; cuDNN made deterministic there, so two
        # replicas give the same bytes for the same seed.
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        self.g, self.cfg, self.meta = load_generator(checkpoint, self.device)  # any storage: s3://..., a folder
        self.path, self.chunk = self.meta["path"], chunk
        self.version = f"step{self.meta['step']}-{self.meta['sha1'][:10]}"

    def noise(self, seeds: list[int], truncation: float | None) -> torch.Tensor:
        return latents(seeds, self.cfg.model.latent_dim, truncation).to(self.device)  # seeds.py's rule

    @torch.no_grad()
    def forward(self, z: torch.Tensor, labels: list[int] | None = None) -> np.ndarray:
        """uint8 (N, H, W, C) from G_ema in padded chunks of a fixed size, so no image depends on its batch."""
        y = None
        if self.cfg.model.conditional:
            y = (torch.tensor(labels) if labels else torch.zeros(len(z), dtype=torch.long)).to(self.device)
        parts = []
        for i in range(0, len(z), self.chunk):
            zc, yc = z[i:i + self.chunk], None if y is None else y[i:i + self.chunk]
            pad = self.chunk - len(zc)
            if pad:
                zc = torch.cat([zc, zc.new_zeros(pad, zc.shape[1])])
                yc = None if yc is None else torch.cat([yc, yc.new_zeros(pad)])
            parts.append(self.g(zc, yc)[: self.chunk - pad])
        x = torch.cat(parts)
        return x.add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def info(self) -> dict[str, Any]:
        out = {"checkpoint": self.path, "step": self.meta["step"], "version": self.version,
               "config": self.cfg.to_dict(), "conditional": self.cfg.model.conditional,
               "num_classes": self.cfg.model.num_classes, "class_names": list(self.cfg.model.class_names),
               "image_size": self.cfg.data.image_size}
        # epsilon and delta of a DP run and what they cover (with a search's cost, from best.json); None: no DP
        out["privacy"] = (self.best or {}).get("privacy") or self.meta.get("privacy")
        if self.best:
            out.update(metric=self.best.get("metric"), value=self.best.get("value"), trial_id=self.best.get("trial_id"))
            out["audit"] = self.best.get("audit")  # the memorization audit's copy rate, when the pipeline ran it
        return out


def class_index(cfg, cls: int | str, flag: str = "--class") -> int:
    """A class given by index or by name (a person's folder name, s7, t-shirt/top) as its index; an unknown
    name is refused in one line naming the nearest known ones."""
    m = cfg.model
    if not m.conditional:
        raise ConfigError(f"{flag}: this model is not class-conditional")
    names = list(m.class_names)
    if isinstance(cls, str) and cls in names:
        return names.index(cls)
    if isinstance(cls, int) or (isinstance(cls, str) and cls.lstrip("-").isdigit()):
        i = int(cls)
        if not 0 <= i < m.num_classes:
            raise ConfigError(f"{flag}: must be in [0, {m.num_classes}) or a name, got {cls}")
        return i
    near = difflib.get_close_matches(str(cls), names, n=3, cutoff=0.0) if names else []
    known = f"; nearest: {', '.join(near)}" if near else " (this model's classes have no names: use an index)"
    raise ConfigError(f"{flag}: unknown class {cls!r}{known}")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: stays on the shell where Gaussian noise lives."""
    omega = torch.arccos(torch.clamp((a / a.norm()) @ (b / b.norm()), -1, 1))
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)

