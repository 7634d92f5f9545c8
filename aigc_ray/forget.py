"""The right to be forgotten: everything aigc_ray derived from a dataset, listed and (with --yes) deleted.

    aigc-ray forget --dataset folder:~/photos/alice                     # lists what would go
    aigc-ray forget --dataset folder:~/photos/alice --yes --storage s3://bucket/runs

What counts as derived: the decoded-image caches, FID reference statistics and domain classifiers (found by
the dataset's id, data.dataset_id), and under the storage every run, search or pipeline whose config or
best.json names the dataset (the whole top-level folder: its checkpoints, samples, audits, reports and Tune
state). The caches searched are the storage's own (<storage>/.cache), $AIGC_RAY_CACHE, ~/.cache/aigc_ray and
any --cache given. Other datasets' files are left alone.
"""

from __future__ import annotations

import json
import os

from . import storage
from .config import ConfigError, check_dataset
from .data import dataset_id

CACHE_KINDS = ("decoded", "fid_refs", "domain")
RECORDS = ("config.json", "best.json")


def _names_dataset(text: str, ident: str) -> bool:
    """Does a config.json or best.json name the dataset (as its training data or its scoring data)?"""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    cfg = doc.get("config", doc) if isinstance(doc, dict) else {}
    sections = [cfg, cfg.get("base", {})] if isinstance(cfg, dict) else []
    for c in sections:
        if not isinstance(c, dict):
            continue
        names = [c.get("data", {}).get("dataset"), c.get("train", {}).get("eval_dataset")]
        if any(isinstance(n, str) and n and dataset_id(n) == ident for n in names):
            return True
    return False


def cache_roots(store: str, extra: tuple[str, ...] = ()) -> list[str]:
    roots = [storage.join(store, ".cache"), os.environ.get("AIGC_RAY_CACHE", ""), "~/.cache/aigc_ray", *extra]
    out: list[str] = []
    for r in roots:
        if r and storage.normalize(r) not in out:
            out.append(storage.normalize(r))
    return out


def derived(dataset: str, store: str, caches: tuple[str, ...] = ()) -> list[str]:
    """Every file or folder derived from `dataset`: cache entries, then top-level folders under the storage."""
    check_dataset(dataset)
    ident, store = dataset_id(dataset), storage.normalize(store)
    found: list[str] = []
    for root in cache_roots(store, caches):
        for kind in CACHE_KINDS:
            for e in storage.list_dir(storage.join(root, kind)):
                stem = e.name.removeprefix("domain-")
                if stem.startswith(ident + "-"):
                    found.append(e.uri)
    for top in storage.list_dir(store):
        if not top.is_dir or top.name.startswith("."):
            continue
        records = [e for e in storage.list_dir(top.uri, recursive=True)
                   if not e.is_dir and storage.name(e.uri) in RECORDS]
        if any(_names_dataset(storage.read_text(e.uri), ident) for e in records):
            found.append(top.uri)
    return found


def forget(dataset: str, store: str, *, yes: bool = False, caches: tuple[str, ...] = (), log=print) -> dict:
    """List what was derived from `dataset`; delete it all when yes. Returns what was found and deleted."""
    if not dataset.startswith("folder:"):
        raise ConfigError(f"forget: --dataset must be a folder:PATH of your own photos, got {dataset!r} "
                          "(public datasets are not private data)")
    found = derived(dataset, store, caches)
    for uri in found:
        log(f"{'deleting' if yes else 'would delete'} {uri}")
    if yes:
        for uri in found:
            storage.delete(uri)
        log(f"[aigc_ray] forgot {dataset}: {len(found)} derived files and folders deleted")
    elif found:
        log(f"[aigc_ray] {len(found)} derived files and folders; run again with --yes to delete them")
    else:
        log(f"[aigc_ray] nothing under {storage.normalize(store)} or the caches was derived from {dataset}")
    return {"dataset": dataset, "found": len(found), "deleted": len(found) if yes else 0}
