"""Export G_ema for use outside aigc_ray: TorchScript or ONNX, a latent input (and a label input when the model
is conditional), images out.

    aigc-ray export --checkpoint runs/faces --format onnx --out g.onnx
    aigc-ray export --checkpoint runs/faces --format torchscript --out g.pt

The exported graph takes z: float32 (N, latent_dim) and, for a conditional model, label: int64 (N,), and
returns image: float32 (N, C, S, S) in [-1, 1]; (image + 1) * 127.5, rounded, is the 8-bit picture. Image i of
seed s uses z = seeds.latents([s + i]) as everywhere else. Every export is checked at once against `sample`'s
own pixels for 16 seeds, and the largest difference is reported (in 8-bit levels and in raw output).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import find, load_generator
from .config import ConfigError
from .seeds import image_seeds, latents
from .serve import Sampler

FORMATS = ("torchscript", "onnx")


class Exported(nn.Module):
    """G with the label an input of its own (a fixed 0 is not asked for by an unconditional model)."""

    def __init__(self, g: nn.Module, conditional: bool):
        super().__init__()
        self.g, self.conditional = g, conditional

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.g(z, label if self.conditional else None)


def _inputs(cfg, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    z = latents(image_seeds(seed, n), cfg.model.latent_dim)
    if cfg.model.conditional:
        return z, torch.arange(n, dtype=torch.int64) % cfg.model.num_classes
    return (z,)


def export(checkpoint: str, fmt: str, out: str) -> dict:
    """Write G_ema of a checkpoint as `fmt` to `out` (a local file), check it against sample's pixels."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = str(find(checkpoint))  # a missing or incomplete checkpoint: one line, nothing written
    g, cfg, meta = load_generator(path)
    model = Exported(g.eval(), cfg.model.conditional).eval()
    example = _inputs(cfg, 2)
    target = Path(out).expanduser()
    if target.is_dir():
        raise ConfigError(f"--out: {target} is a folder; name the file to write (g.onnx, g.pt)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")  # whole or not at all
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notes; the file is standard
            if fmt == "torchscript":
                torch.jit.save(torch.jit.trace(model, example), str(tmp))
            else:
                names = ["z", "label"][:len(example)]
                torch.onnx.export(model, example, str(tmp), input_names=names, output_names=["image"],
                                  dynamic_axes={**{k: {0: "n"} for k in names}, "image": {0: "n"}}, dynamo=False)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    check = compare(target, fmt, path)
    return {"out": str(target), "format": fmt, "checkpoint": path, "step": meta["step"],
            "inputs": ["z", "label"] if cfg.model.conditional else ["z"], "latent_dim": cfg.model.latent_dim,
            "class_names": list(cfg.model.class_names), **check}


def run_exported(target: Path, fmt: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The exported file's images for inputs: TorchScript through torch, ONNX through onnxruntime."""
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(target))(*inputs)
    import onnxruntime  # an optional extra: only to check an exported ONNX file

    sess = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return torch.from_numpy(sess.run(["image"], {k: v.numpy() for k, v in zip(names, inputs)})[0])


def compare(target: Path, fmt: str, checkpoint: str, n: int = 16) -> dict:
    """The exported file against `sample`'s own pixels (serve.Sampler) for seeds 0..n-1 (class i % classes)."""

    sampler = Sampler(checkpoint)
    inputs = _inputs(sampler.cfg, n)
    labels = inputs[1].tolist() if len(inputs) > 1 else None
    want = sampler.forward(sampler.noise(image_seeds(0, n), None), labels)  # uint8 (N, H, W, C)
    try:
        got = run_exported(target, fmt, inputs)
    except ImportError:
        return {"check": "skipped: onnxruntime is not installed (pip install onnxruntime)"}
    pixels = got.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        raw = sampler.g(*[t.to(sampler.device) for t in inputs]) if labels is not None else sampler.g(inputs[0], None)
    return {"max_abs_pixel_diff": int(abs(pixels.astype(int) - want.astype(int)).max()),
            "max_abs_output_diff": float((got - raw.cpu()).abs().max()), "checked_images": n}
