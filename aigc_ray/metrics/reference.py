"""Reference statistics and features of a dataset split under a metric's extractor, made once and cached
(under data.cache, which is the storage's own on a remote run storage) with a JSON note of how."""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import torch

from .. import data, storage
from ..config import DataConfig
from .distances import FeatureStats
from .fanout import compute
from .features import cache_uri, extractor


def reference(data_cfg: DataConfig, split: str, metric: str, num_workers: int = 0, log=print,
              max_images: int | None = None) -> dict:
    """Stats and features of a dataset split (its first max_images) under a metric's extractor; cached."""
    ds = data.load(data_cfg, split)
    if max_images:
        ds.images = ds.images[:max_images]
    ext = extractor(metric, data_cfg)
    digest = hashlib.sha1(ds.images.numpy().tobytes()).hexdigest()[:12]
    name = f"{data.dataset_id(data_cfg.dataset)}-{split}-{data_cfg.image_size}px-{ext.id}-{digest}"
    uri = cache_uri(data_cfg, "fid_refs", f"{name}.npz")
    if storage.exists(uri):
        z = np.load(io.BytesIO(storage.read_bytes(uri)))
        stats = FeatureStats(z["s1"].shape[0])
        stats.n, stats.s1, stats.s2 = int(z["n"]), torch.from_numpy(z["s1"]), torch.from_numpy(z["s2"])
        return {"path": uri, "stats": stats, "features": torch.from_numpy(z["features"])}
    t0 = time.time()
    log(f"[aigc_ray] computing {ext.name} reference statistics of {data_cfg.dataset} {split} "
        f"({len(ds)} images), once; cached at {uri}")
    feats = compute({"images": ds.images}, metric, data_cfg, "features", num_workers)
    stats = FeatureStats(feats.shape[1]).add(feats)
    buf = io.BytesIO()
    np.savez(buf, n=stats.n, s1=stats.s1.numpy(), s2=stats.s2.numpy(), features=feats.float().numpy())
    storage.write_bytes(uri, buf.getvalue())
    storage.write_text(cache_uri(data_cfg, "fid_refs", f"{name}.json"), json.dumps({
        "dataset": data.dataset_id(data_cfg.dataset), "split": split, "image_size": data_cfg.image_size,
        "channels": int(ds.images.shape[1]), "extractor": ext.id, "images": len(ds), "images_sha1": digest,
        "resize": "bilinear to 299x299, then (x - 128) / 128" if ext.name == "inception" else "none",
        "seconds": round(time.time() - t0, 1), "made": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2))
    return {"path": uri, "stats": stats, "features": feats.float()}

