"""Turning generated tensors into the pictures people look at: uint8, grids, PNG bytes, files.

    save_png("grid.png", grid(to_uint8(x)))          # x: float (N, C, H, W) in [-1, 1]
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, the way images are saved (round to nearest, clamp)."""
    return x.detach().float().add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).cpu()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (H', W', C) image, nrow per row (default: a square), black padding."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    out = np.zeros((pad + rows * (h + pad), pad + nrow * (w + pad), c), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        out[top:top + h, left:left + w] = arr[i]
    return out


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W, C) with C in {1, 3} -> PNG bytes. Level 1: ~5x faster than 6 at ~10% more bytes."""
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a PNG atomically (a crash never leaves half a file under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png_bytes(image, compress_level=6))
    os.replace(tmp, path)
    return path
