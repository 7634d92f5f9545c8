"""Self-describing checkpoints: everything needed to resume, sample, evaluate or serve, in one folder.

    <checkpoint>/model.pt      G, G_ema, D, both optimisers, step, RNG state, config (torch.save)
    <checkpoint>/config.json   the resolved config, readable
    <checkpoint>/samples.png   a grid from G_ema on the run's fixed noise (same noise every time)
    <checkpoint>/meta.json     step, metrics, file sizes; written last, so it marks a complete checkpoint

    G, cfg, meta = load_generator("runs/demo")       # a checkpoint folder, or a run folder: its latest

Loading uses torch.load(weights_only=True): a checkpoint holding a pickle that would run code is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, validate

MODEL_FILE, CONFIG_FILE, GRID_FILE, META_FILE = "model.pt", "config.json", "samples.png", "meta.json"
FORMAT_VERSION = 1


class CheckpointError(ConfigError):
    """A checkpoint path is missing, incomplete, corrupt or unsafe; the message names the file."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(directory: str | Path, *, state: dict[str, Any], cfg: Config, grid_png: bytes | None,
         metrics: dict[str, float]) -> Path:
    """Write a checkpoint folder; meta.json (with every file's size) goes last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{MODEL_FILE}.tmp"
    torch.save({**state, "config": cfg.to_dict(), "format": FORMAT_VERSION}, tmp)
    os.replace(tmp, d / MODEL_FILE)
    _write_atomic(d / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2).encode())
    if grid_png is not None:
        _write_atomic(d / GRID_FILE, grid_png)
    files = {p.name: p.stat().st_size for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}
    meta = {"step": int(state["step"]), "metrics": metrics, "files": files, "format": FORMAT_VERSION}
    _write_atomic(d / META_FILE, json.dumps(meta, indent=2).encode())
    return d


def is_complete(directory: Path) -> bool:
    """meta.json exists and every file it lists has the size it had when written."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
        return all((directory / name).stat().st_size == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find(path: str | Path) -> Path:
    """The checkpoint folder a user means: the folder itself, or the newest complete one under it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint: {p} does not exist")
    if (p / MODEL_FILE).exists() or (p / META_FILE).exists():
        if not is_complete(p):
            raise CheckpointError(f"checkpoint: {p} is incomplete (meta.json missing or files truncated)")
        return p
    found = [c for c in p.glob("**/checkpoint_*") if c.is_dir() and is_complete(c)]
    if not found:
        raise CheckpointError(f"checkpoint: no complete checkpoint under {p}")
    return max(found, key=lambda c: (json.loads((c / META_FILE).read_text())["step"], c.stat().st_mtime))


def read_best(path: str | Path) -> dict[str, Any]:
    """A search's best.json (written by tune.search): at least the checkpoint it names, checked to exist."""
    p = Path(path).expanduser()
    try:
        best = json.loads(p.read_text())
        checkpoint = best["checkpoint"]
    except OSError as e:
        raise CheckpointError(f"best.json: cannot read {p}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"best.json: {p} is not a search's best.json (JSON with a 'checkpoint')") from None
    find(checkpoint)
    return best


def read_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())


def load(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """The state dict of a checkpoint (folder or run folder), loaded weights-only."""
    d = find(path)
    f = d / MODEL_FILE
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling refused, truncated zip, ...: one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint: cannot load {f} safely: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {f} is not an aigc_ray checkpoint (format {FORMAT_VERSION})")
    state["path"] = str(d)
    return state


def config_of(state: dict[str, Any]) -> Config:
    return validate(Config.from_dict(state["config"]))


def load_generator(path: str | Path, device="cpu", ema: bool = True):
    """(G in eval mode, its Config, meta) rebuilt from the checkpoint alone."""
    from .models import build

    state = load(path, map_location=device)
    cfg = config_of(state)
    g, _ = build(cfg)
    g.load_state_dict(state["g_ema" if ema and state.get("g_ema") is not None else "g"])
    g.to(device).eval()
    return g, cfg, {**read_meta(state["path"]), "path": state["path"]}
