"""Find yourself in the model (GAN inversion): the latent z whose image G(z) (of a class, where given) matches a
photo.

    aigc-ray invert --checkpoint runs/faces --image me.png --class alice --out me/
    # me/latent.npz (z, class, losses), me/reconstruction.png (the photo beside G(z)), me/loss.png

Optimisation in latent space (Image2StyleGAN's recipe, for a DCGAN-sized G): the best of `starts` random
latents by the loss, then Adam on z for `steps` steps. The loss is a pixel loss (mean squared error in [-1, 1])
plus a feature loss (1 - cosine similarity of features: the domain classifier's where the dataset has labels to
train one on, else Inception's) plus a weak pull of |z|^2 / latent_dim towards 1, where Gaussian latents live.
The latent can then be used everywhere a seed is: POST /generate and /interpolate take it (`latent`), so a
user can walk from their own photo to any seed. Ray-free; the service runs it on a replica (POST /invert).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from . import storage
from .config import Config, ConfigError
from .images import grid, png_bytes
from .metrics import has_labels
from .metrics.features import _domain_key, _inception_cached, cache_uri, domain
from .seeds import latents

FEATURE_WEIGHT = 0.5
PRIOR_WEIGHT = 1e-3


@dataclass
class Inverted:
    z: torch.Tensor  # (latent_dim,)
    label: int | None
    image: np.ndarray  # uint8 (H, W, C): G(z)
    losses: list[float]  # per step
    pixel_error: float  # mean absolute error in 8-bit levels against the photo
    seconds: float


def photo_tensor(blob: bytes, cfg: Config, name: str = "--image") -> torch.Tensor:
    """An uploaded or read photo as G's input space: float (1, C, S, S) in [-1, 1], center-cropped square."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
            if im.mode not in ("L", "RGB", "RGBA", "P"):  # CMYK, LA, 16-bit, float: not a photo G can match
                raise ConfigError(f"{name}: a {im.mode} image with {len(im.getbands())} channels; send grayscale (1) "
                                  "or RGB (3 channels)")
            rgb = im.convert("L" if cfg.data.channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"{name}: not an image this service can read ({str(e).splitlines()[0]})") from None
    w, h = rgb.size
    side = min(w, h)
    rgb = rgb.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    rgb = rgb.resize((cfg.data.image_size, cfg.data.image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).reshape(cfg.data.image_size, cfg.data.image_size, -1)
    return (x.permute(2, 0, 1) / 127.5 - 1).unsqueeze(0)


def feature_fn(cfg: Config, train_domain: bool = True):
    """A differentiable feature map of images in [-1, 1]: the domain classifier's body, else Inception's.
    train_domain=False (a service replica): the domain classifier only if it is already in the cache."""
    usable = has_labels(cfg.data) and (train_domain or storage.exists(
        cache_uri(cfg.data, "domain", f"{_domain_key(cfg.data)}.pt")))
    if usable:
        net = domain(cfg.data).net.eval().requires_grad_(False)
        return net.body
    inception = _inception_cached("cpu")
    net = inception.net

    def inception_features(x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate((x + 1) * 127.5, size=(299, 299), mode="bilinear", align_corners=False)
        return net(x / 128.0 - 1.0)

    return inception_features


def invert(g: torch.nn.Module, cfg: Config, photo: torch.Tensor, *, label: int | None = None, steps: int = 200,
           starts: int = 16, lr: float = 0.05, seed: int = 0, features=None) -> Inverted:
    """The latent of G whose image matches photo (float (1, C, S, S) in [-1, 1])."""
    t0 = time.time()
    m = cfg.model
    if m.conditional and label is None:
        raise ConfigError("invert: this model is conditional: give --class (a name or an index)")
    y = torch.tensor([label]) if m.conditional else None
    features = features or feature_fn(cfg)
    g = g.eval().requires_grad_(False)
    with torch.no_grad():
        target_f = F.normalize(features(photo).flatten(1), dim=1)

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        x = g(z, None if y is None else y.expand(len(z)))
        pixel = (x - photo).pow(2).flatten(1).mean(1)
        feat = 1 - (F.normalize(features(x).flatten(1), dim=1) * target_f).sum(1)
        prior = (z.pow(2).mean(1) - 1).pow(2)
        return pixel + FEATURE_WEIGHT * feat + PRIOR_WEIGHT * prior

    with torch.no_grad():  # the best of a few random starts
        candidates = latents(list(range(seed, seed + starts)), m.latent_dim)
        z = candidates[loss_of(candidates).argmin()].clone().unsqueeze(0)
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(z).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        x = g(z, y)
    image = x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    target = photo.add(1).mul(127.5).round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
    return Inverted(z.detach()[0], label, image, losses, float(np.abs(image.astype(float) - target).mean()),
                    round(time.time() - t0, 2))


def write(out: str, inv: Inverted, photo: torch.Tensor, class_name: str | None = None) -> dict:
    """<out>/latent.npz, reconstruction.png (the photo beside G(z)) and loss.png, at any storage location."""
    # Only when a loss curve is drawn: the import costs ~0.5 s, and makes matplotlib's folder under $HOME (a
    # dry run of any command must write nothing).
    import matplotlib

    matplotlib.use("Agg")  # files, never a window
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    np.savez(buf, z=inv.z.numpy(), label=-1 if inv.label is None else inv.label, losses=np.asarray(inv.losses))
    files = {"latent.npz": buf.getvalue()}
    pair = torch.stack([photo.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)[0],
                        torch.from_numpy(inv.image).permute(2, 0, 1)])
    files["reconstruction.png"] = png_bytes(grid(pair, nrow=2))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(inv.losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("inversion: pixel + feature loss")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    files["loss.png"] = png.getvalue()
    for name, blob in files.items():
        storage.write_bytes(storage.join(storage.normalize(out), name), blob)
    return {"out": storage.normalize(out), "files": sorted(files), "class": class_name, "steps": len(inv.losses),
            "final_loss": inv.losses[-1] if inv.losses else None, "pixel_error": inv.pixel_error,
            "seconds": inv.seconds}
