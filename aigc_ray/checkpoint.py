"""Self-describing checkpoints: everything needed to resume, sample, evaluate or serve, in one folder.

    <checkpoint>/model.pt      G, G_ema, D, both optimisers, step, RNG state, config (torch.save)
    <checkpoint>/config.json   the resolved config, readable
    <checkpoint>/samples.png   a grid from G_ema on the run's fixed noise (same noise every time)
    <checkpoint>/meta.json     step, metrics, file sizes; written last, so it marks a complete checkpoint

    G, cfg, meta = load_generator("runs/demo")                 # a checkpoint folder, or a run folder: its latest
    G, cfg, meta = load_generator("s3://bucket/runs/demo")     # the same at any storage location (storage.py)

A checkpoint is complete when meta.json is there and every file it lists has the size it names; the
writer puts meta.json last, locally and on object stores alike, so a reader never takes half a
checkpoint for a whole one. Loading uses torch.load(weights_only=True): a checkpoint holding a pickle
that would run code is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import torch

from . import storage
from .config import Config, ConfigError, validate
from .gan.models import build
from .privacy import guarantee

MODEL_FILE, CONFIG_FILE, GRID_FILE, META_FILE = "model.pt", "config.json", "samples.png", "meta.json"
FORMAT_VERSION = 1


class CheckpointError(ConfigError):
    """A checkpoint path is missing, incomplete, corrupt or unsafe; the message names the file."""


def encode(*, state: dict[str, Any], cfg: Config, grid_png: bytes | None, metrics: dict[str, float]) -> dict[str, bytes]:
    """A checkpoint's files as bytes, in the order they must be written: meta.json (with every size) last."""
    buf = io.BytesIO()
    torch.save({**state, "config": cfg.to_dict(), "format": FORMAT_VERSION}, buf)
    files = {MODEL_FILE: buf.getvalue(), CONFIG_FILE: json.dumps(cfg.to_dict(), indent=2).encode()}
    if grid_png is not None:
        files[GRID_FILE] = grid_png
    meta = {"step": int(state["step"]), "metrics": metrics, "files": {n: len(b) for n, b in files.items()},
            "format": FORMAT_VERSION}
    if state.get("init_from"):  # a fine-tuned run says whose weights it started from
        meta["init_from"] = state["init_from"]
    if state.get("privacy"):  # a DP run's checkpoint says what it guarantees
        meta["privacy"] = guarantee(state["privacy"], state.get("init_from"))
    files[META_FILE] = json.dumps(meta, indent=2).encode()
    return files


def write(directory: str, files: dict[str, bytes]) -> str:
    """Write encoded files to a folder at any storage location, in order (meta.json last)."""
    for fname, data in files.items():
        storage.write_bytes(storage.join(directory, fname), data)
    return directory


def save(directory: str, *, state: dict[str, Any], cfg: Config, grid_png: bytes | None,
         metrics: dict[str, float]) -> str:
    """Write a checkpoint folder (a local path or a storage URI); meta.json goes last."""
    return write(storage.normalize(directory), encode(state=state, cfg=cfg, grid_png=grid_png, metrics=metrics))


def _complete(directory: str, sizes: dict[str, int]) -> dict | None:
    """The meta of a checkpoint folder whose listed files have the sizes meta.json names, else None."""
    if META_FILE not in sizes:
        return None
    try:
        meta = json.loads(storage.read_text(storage.join(directory, META_FILE)))
        ok = all(sizes.get(name) == size for name, size in meta["files"].items())
    except (storage.StorageError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta if ok else None


def _sizes(directory: str) -> dict[str, int]:
    return {e.name: e.size for e in storage.list_dir(directory) if not e.is_dir}


def is_complete(directory: str) -> bool:
    """meta.json exists and every file it lists has the size it had when written."""
    return _complete(storage.normalize(directory), _sizes(storage.normalize(directory))) is not None


def complete_checkpoints(root: str) -> list[tuple[str, dict]]:
    """(folder, meta) of every complete checkpoint_* folder under root (one recursive listing)."""
    root = storage.normalize(root)
    folders: dict[str, dict[str, int]] = {}
    for e in storage.list_dir(root, recursive=True):
        parts = e.name.split("/")
        if not e.is_dir and len(parts) >= 2 and parts[-2].startswith("checkpoint_"):
            folders.setdefault("/".join(parts[:-1]), {})[parts[-1]] = e.size
    found = []
    for rel, sizes in sorted(folders.items()):
        d = storage.join(root, rel)
        meta = _complete(d, sizes)
        if meta is not None:
            found.append((d, meta))
    return found


def find(path: str) -> str:
    """The checkpoint folder a user means: the folder itself, or the newest complete one under it."""
    uri = storage.normalize(path)
    if storage.info(uri) is None:
        raise CheckpointError(f"checkpoint: {uri} does not exist")
    sizes = _sizes(uri)
    if MODEL_FILE in sizes or META_FILE in sizes:
        if _complete(uri, sizes) is None:
            raise CheckpointError(f"checkpoint: {uri} is incomplete (meta.json missing or files truncated)")
        return uri
    found = complete_checkpoints(uri)
    if not found:
        raise CheckpointError(f"checkpoint: no complete checkpoint under {uri}")
    return max(found, key=lambda dm: (dm[1]["step"], dm[0]))[0]


def read_best(path: str) -> dict[str, Any]:
    """A search's best.json (written by tune.search): at least the checkpoint it names, checked to exist."""
    uri = storage.normalize(path)
    try:
        best = json.loads(storage.read_text(uri))
        checkpoint = best["checkpoint"]
    except storage.StorageError as e:
        raise CheckpointError(f"best.json: cannot read {uri}: {str(e).removeprefix('storage: ')}") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"best.json: {uri} is not a search's best.json (JSON with a 'checkpoint')") from None
    find(checkpoint)
    return best


def read_meta(directory: str) -> dict:
    return json.loads(storage.read_text(storage.join(directory, META_FILE)))


def load(path: str, map_location="cpu") -> dict[str, Any]:
    """The state dict of a checkpoint (folder or run folder), loaded weights-only."""
    d = find(path)
    f = storage.join(d, MODEL_FILE)
    data = storage.read_bytes(f)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling refused, truncated zip, ...: one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint: cannot load {f} safely: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {f} is not an aigc_ray checkpoint (format {FORMAT_VERSION})")
    state["path"], state["sha1"] = d, hashlib.sha1(data).hexdigest()
    return state


def config_of(state: dict[str, Any]) -> Config:
    return validate(Config.from_dict(state["config"]))


def load_generator(path: str, device="cpu", ema: bool = True):
    """(G in eval mode, its Config, meta) rebuilt from the checkpoint alone."""
    state = load(path, map_location=device)
    cfg = config_of(state)
    g, _ = build(cfg)
    g.load_state_dict(state["g_ema" if ema and state.get("g_ema") is not None else "g"])
    g.to(device).eval()
    return g, cfg, {**read_meta(state["path"]), "path": state["path"], "sha1": state["sha1"]}
