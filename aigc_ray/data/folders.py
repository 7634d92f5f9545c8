"""Folders of photos (folder:PATH, a local folder or an object-store prefix): listed, labelled by subfolder
(one per person), decoded in parallel by Ray tasks (a face crop on request), and cached under the storage as
pixels only, under a name that is a hash of where the folder is."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import storage
from ..config import DataConfig, cache_root
from .faces import crop_face
from .sets import DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def folder_classes(files: list[storage.Entry]) -> tuple[list[str], list[int] | None]:
    """(class names, each file's label) of a folder: labeled when every image sits in a subfolder."""
    if not files or any("/" not in f.name for f in files):
        return [], None
    names = sorted({f.name.split("/", 1)[0] for f in files})
    index = {n: i for i, n in enumerate(names)}
    return names, [index[f.name.split("/", 1)[0]] for f in files]


def _decode(files: list, size: int, channels: int, crop: int | None = None, names: list[str] | None = None,
            face_crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files (paths, file objects or bytes) to uint8 (N, C, size, size): a center crop (or, with
    face_crop, the largest face: faces.crop_face), bicubic resize. Also returns which images were kept: with
    face_crop, a photo without a face is left out (its slot is zeros), never squashed whole."""
    mode = "L" if channels == 1 else "RGB"
    out = np.zeros((len(files), size, size, channels), dtype=np.uint8)
    kept = np.ones(len(files), dtype=bool)
    for i, f in enumerate(files):
        try:
            with Image.open(io.BytesIO(f) if isinstance(f, bytes) else f) as im:
                im = im.convert(mode)
                if face_crop:
                    face = crop_face(np.asarray(im), size)
                    kept[i] = face is not None
                    if face is not None:
                        out[i] = face.reshape(size, size, channels)
                    continue
                w, h = im.size
                side = crop or min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                out[i] = np.asarray(im).reshape(size, size, channels)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"data.dataset: cannot read image {names[i] if names else f}: "
                            f"{str(e).splitlines()[0]}") from None
    return out.transpose(0, 3, 1, 2), kept


def _decode_uris(uris: list[str], blobs: list[bytes] | None, size: int, channels: int,
                 crop: int | None, face_crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One Ray task's share: read the files from storage (or take the bytes shipped with it) and decode."""
    return _decode(blobs if blobs is not None else [storage.read_bytes(u) for u in uris], size, channels, crop,
                   names=uris, face_crop=face_crop)


def decode_files(uris: list[str], size: int, channels: int, crop: int | None = None, chunk: int = 64,
                 face_crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files in parallel across the cluster's CPUs, in order, when Ray is running; (images, kept).

    Files in an object store are read by the tasks themselves; files only this machine has are read
    here and shipped with the task, so no node ever needs them on its own disk.
    """
    import ray  # only here: a process that never decodes a folder need not import Ray

    if not ray.is_initialized() or len(uris) <= chunk:
        return _decode_uris(uris, None, size, channels, crop, face_crop)
    task = ray.remote(num_cpus=1, max_retries=3)(_decode_uris)
    refs = []
    for i in range(0, len(uris), chunk):
        part = uris[i:i + chunk]
        blobs = None if storage.is_remote(part[0]) else [storage.read_bytes(u) for u in part]
        refs.append(task.remote(part, blobs, size, channels, crop, face_crop))
    try:
        parts = ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (DataError, storage.StorageError)):
            raise e.cause from None
        raise
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def dataset_id(name: str) -> str:
    """How caches name a dataset: its name, or for a folder a hash of where it is, so no folder path, file name
    or photo metadata ever reaches a cache's file names (`aigc-ray forget` finds them by it)."""
    if name.startswith("folder:"):
        where = storage.normalize(name[len("folder:"):]).rstrip("/")
        return "folder-" + hashlib.sha1(where.encode()).hexdigest()[:12]
    return name


def cached(cache: str, ident: str, key: str, make) -> dict[str, np.ndarray]:
    """Decoded arrays (pixels only, and which photos were kept) are cached under <cache>/decoded as <dataset
    id>-<hash of the content key>.npz (decoding is slow). make() returns {"images": ..., "kept": ...}."""
    uri = storage.join(storage.normalize(cache), "decoded",
                       f"{ident}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    if storage.exists(uri):
        with np.load(io.BytesIO(storage.read_bytes(uri))) as z:
            return {k: z[k] for k in z.files}
    arrays = make()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())  # whole or not at all: never a half-written cache entry
    return arrays


def image_files(folder: str) -> list[storage.Entry]:
    """The image files under a folder or object-store prefix, recursively, sorted by path."""
    return [e for e in storage.list_dir(folder, recursive=True)
            if not e.is_dir and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS]


def folder_files(cfg: DataConfig) -> list[storage.Entry]:
    """A folder dataset's image files, or one line saying why there are none; in a folder of people (one
    subfolder each), a subfolder without images is refused too."""
    src = storage.normalize(cfg.dataset[len("folder:"):])
    where = storage.info(src)
    if where is None:
        raise DataError(f"data.dataset: folder {src} does not exist")
    if not where.is_dir:
        raise DataError(f"data.dataset: {src} is not a folder")
    files = image_files(src)
    if not files:
        raise DataError(f"data.dataset: folder {src} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    names, _ = folder_classes(files)
    if names:
        empty = sorted({e.name for e in storage.list_dir(src) if e.is_dir and not e.name.startswith(".")} - set(names))
        if empty:
            raise DataError(f"data.dataset: subfolder {empty[0]!r} of {src} holds no images; each subfolder is one "
                            "person (a label): add their photos or remove it")
    return files


def folder(cfg: DataConfig, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A folder's images and which files they came from (all of them, unless face_crop skipped some)."""
    files = folder_files(cfg)  # sorted by path, so labels (_folder_classes) follow the same order
    key = "|".join(f"{f.uri}:{f.size}:{f.mtime_ns}" for f in files)
    crop = "|faces" if cfg.face_crop else ""

    def make():
        images, kept = decode_files([f.uri for f in files], cfg.image_size, channels, face_crop=cfg.face_crop)
        return {"images": images[kept], "kept": np.flatnonzero(kept)}

    got = cached(cache_root(cfg), dataset_id(cfg.dataset), f"folder|{cfg.image_size}|{channels}{crop}|{key}", make)
    if cfg.face_crop:
        if not len(got["kept"]):
            raise DataError(f"data.face_crop: no face found in any of the {len(files)} photos of {cfg.dataset}; "
                            "train without --face-crop, or with photos that show a face")
        if len(got["kept"]) < len(files):
            print(f"[aigc_ray] face crop: a face in {len(got['kept'])} of {len(files)} photos; the "
                  f"{len(files) - len(got['kept'])} without one are skipped", flush=True)
    return got["images"], got["kept"]

