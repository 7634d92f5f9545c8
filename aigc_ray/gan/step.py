"""One GAN training step in plain PyTorch, and the state it moves: G, D, G_ema, optimisers, ADA, DP.

    state = build_state(cfg, size=len(images))          # fresh networks, optimisers, EMA (and DP's D)
    stats = train_step(state, batches, cfg)             # n_critic D updates, one G update, one EMA update
    blob = state_dict(state)                            # what a checkpoint saves; load_state_dict resumes

No Ray here: a unit test runs it on one CPU, and every Ray Train worker runs the same function on its own
shard (aigc_ray.train.worker), with G and D DDP-wrapped by `wrap`.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import privacy
from ..config import Config, ConfigError
from ..images import grid, png_bytes, to_uint8
from ..seeds import derive, image_seeds, latents
from .augment import Augment
from .losses import LOSSES, per_example_d, r1_penalty
from .models import build, generate

GRID_SIZE = 64
R1_EVERY = 16  # lazy R1 (StyleGAN2): every 16th D update, weighted 16x
ADA_INTERVAL = 4  # D steps between moves of the adaptive augmentation strength (ADA's)
PRIVATE_STATS = ("loss_d", "d_real", "r_t", "r1")  # computed on training images: a DP run never reports them


@dataclass
class TrainState:
    g: nn.Module  # G, DDP-wrapped when distributed
    d: nn.Module  # D, DDP-wrapped when distributed
    g_ema: nn.Module | None  # exponential moving average of G's weights (never wrapped)
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    aug: Augment  # what D sees of real and fake images, and its strength p
    step: int = 0  # G updates done
    d_steps: int = 0  # D updates done (R1 runs on every R1_EVERY-th)
    r_t: list = field(default_factory=list)  # ADA's E[sign(D(real))] of the steps since p last moved
    private: privacy.Private | None = None  # with DP: the accountant (D is then Opacus-wrapped, not DDP)
    init_from: dict | None = None  # the checkpoint whose weights the run started from (aigc_ray.warmstart)


def unwrap(m: nn.Module) -> nn.Module:
    """The plain network inside a DDP (.module) or Opacus (._module) wrapper."""
    m = getattr(m, "module", m)
    return getattr(m, "_module", m)


def build_state(cfg: Config, device: torch.device | str = "cpu",
                wrap: Callable[[nn.Module], nn.Module] = lambda m: m, size: int = 0) -> TrainState:
    """Fresh networks, optimisers and EMA for a resolved config; `wrap` adds DDP. With DP (size: the
    training images, for the sampling rate), D gets per-example gradients and a clipping, noising
    optimiser instead of DDP."""
    torch.manual_seed(derive(cfg.train.seed, "init"))
    g, d = build(cfg)
    g, d = g.to(device), d.to(device)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False) if cfg.train.ema_decay > 0 else None
    o = cfg.optim
    opt_g = torch.optim.Adam(g.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    fp16 = cfg.train.amp == "fp16"
    dev = torch.device(device).type
    a = cfg.augment
    aug = Augment("none" if a.policy == "auto" else a.policy, a.p, adaptive=a.adaptive, target=a.target,
                  speed=a.speed)
    private = None
    if cfg.privacy.enabled:
        if not size:
            raise ConfigError("privacy: a DP run needs the number of training images (build_state(size=...))")
        d, opt_d, private = privacy.make_private(d, opt_d, cfg, size)
    else:
        d = wrap(d)
    return TrainState(wrap(g), d, g_ema, opt_g, opt_d, torch.amp.GradScaler(dev, enabled=fp16),
                      torch.amp.GradScaler(dev, enabled=fp16), aug, private=private)


def _autocast(cfg: Config, device_type: str):
    if cfg.train.amp in ("bf16", "fp16"):
        return torch.autocast(device_type, dtype=torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16)
    return nullcontext()


@torch.no_grad()
def update_ema(g_ema: nn.Module, g: nn.Module, decay: float, step: int) -> None:
    """p_ema <- decay * p_ema + (1 - decay) * p, with a warm-up so early samples are not all init."""
    decay = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(g_ema.parameters(), g.parameters()):
        pe.lerp_(p.detach(), 1 - decay)
    for be, b in zip(g_ema.buffers(), g.buffers()):
        be.copy_(b)


def train_step(state: TrainState, next_batch: Callable[[], tuple], cfg: Config) -> dict[str, torch.Tensor]:
    """n_critic D updates then one G update; returns detached stats (loss_d, loss_g, loss extras).

    D sees real and fake images through the same augmentation (state.aug), G is trained through it;
    R1 (loss.r1_weight) is added every R1_EVERY-th D update, scaled up by as much (lazy regularisation).
    With DP, D is called once on real + fake and its loss is a sum of per-example terms, so Opacus can clip
    each image's gradient; the fakes then get labels of their own (never the real images').
    """
    d_loss_fn, g_loss_fn = LOSSES[cfg.loss.name]
    g, d, m, aug, private = state.g, state.d, cfg.model, state.aug, state.private
    amp = _autocast(cfg, next(unwrap(g).parameters()).device.type)
    stats: dict[str, torch.Tensor] = {}

    # Update D: minimise its loss on real images and G's (detached) fakes, n_critic times.
    for i in range(cfg.loss.n_critic):
        real, y = next_batch()
        device = real.device
        n_fake = cfg.train.batch_size if private else real.shape[0]  # DP: a Poisson batch has any size
        z = torch.randn(n_fake, m.latent_dim, device=device)
        y = y if m.conditional else None
        y_fake = torch.randint(m.num_classes, (n_fake,), device=device) if private and m.conditional else y
        last = i == cfg.loss.n_critic - 1
        with amp, torch.set_grad_enabled(last):  # the last fakes keep their graph for G's update
            fake = g(z, y_fake)
        real = aug(real)
        state.d_steps += 1
        if private:
            loss_d, d_stats = _private_d_step(state, real, aug(fake.detach()), y, y_fake, cfg, amp)
            continue
        with amp:
            loss_d, d_stats = d_loss_fn(d, real, aug(fake.detach()), y, cfg.loss)
        if cfg.loss.r1_weight and state.d_steps % R1_EVERY == 0:
            r1 = r1_penalty(d, real, y)
            loss_d = loss_d + cfg.loss.r1_weight / 2 * R1_EVERY * r1
            d_stats["r1"] = r1.detach()
        state.opt_d.zero_grad(set_to_none=True)
        state.scaler_d.scale(loss_d).backward()
        state.scaler_d.step(state.opt_d)
        state.scaler_d.update()

    # Update G: minimise its loss through D. D is called unwrapped and frozen, so no D gradients
    # are computed or all-reduced; G's DDP wrapper still averages G's gradients across workers.
    d_plain = unwrap(d).requires_grad_(False)
    if private:
        d.disable_hooks()  # no per-example gradients of D in G's forward and backward
    try:
        with amp:
            loss_g, g_stats = g_loss_fn(d_plain, aug(fake), y_fake, cfg.loss)
        state.opt_g.zero_grad(set_to_none=True)
        state.scaler_g.scale(loss_g).backward()
    finally:
        d_plain.requires_grad_(True)
        if private:
            d.enable_hooks()
    state.scaler_g.step(state.opt_g)
    state.scaler_g.update()

    state.step += 1
    if state.g_ema is not None:
        update_ema(state.g_ema, unwrap(g), cfg.train.ema_decay, state.step)
    if aug.adaptive and aug.ops:
        _adapt(state, d_stats["r_t"], real.shape[0])
    stats.update(d_stats, **g_stats, loss_d=loss_d.detach().float(), loss_g=loss_g.detach().float())
    if aug.on:
        stats["aug_p"] = torch.tensor(aug.p)
    if private:  # only what DP covers leaves the step: nothing computed on the real images (their loss, D's
        # scores of them, the Poisson batch's size) reaches the progress lines, TensorBoard or a checkpoint
        for k in PRIVATE_STATS:
            stats.pop(k, None)
    return stats


def _private_d_step(state: TrainState, real: torch.Tensor, fake: torch.Tensor, y, y_fake, cfg: Config, amp):
    """One DP-SGD step of D on a Poisson batch and as many fakes, in pieces of at most
    privacy.max_physical_batch images: each piece's per-image gradients are clipped and summed (Opacus'
    signal_skip_step, as its BatchMemoryManager does), and the last piece adds the noise once and steps. So a
    logical batch of any size is one step of the accountant, with memory bounded by the piece."""
    per = max(1, cfg.privacy.max_physical_batch // 2)
    pieces = max(1, -(-max(real.shape[0], fake.shape[0]) // per))
    total, stats = 0.0, {}
    for k in range(pieces):
        part = slice(k * per, (k + 1) * per)
        with amp:
            loss, stats = per_example_d(state.d, real[part], fake[part], None if y is None else y[part],
                                        None if y_fake is None else y_fake[part], cfg.loss)
        state.opt_d.zero_grad(set_to_none=True)  # keeps the pieces' clipped sums while steps are skipped
        state.scaler_d.scale(loss).backward()
        if k < pieces - 1:
            state.opt_d.signal_skip_step(do_skip=True)
        state.scaler_d.step(state.opt_d)
        state.scaler_d.update()
        total += float(loss.detach())
    state.private.step()
    return torch.tensor(total / (real.shape[0] + fake.shape[0])), stats  # a mean, like the other losses


def _adapt(state: TrainState, r_t: torch.Tensor, batch: int) -> None:
    """ADA: every ADA_INTERVAL steps, r_t averaged over those steps and over all workers moves p."""
    state.r_t.append(r_t.float())
    if len(state.r_t) < ADA_INTERVAL:
        return
    mean = torch.stack(state.r_t).mean()
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        dist.all_reduce(mean)
        mean = mean / world
    state.aug.adjust(float(mean), ADA_INTERVAL * batch * world)
    state.r_t.clear()


def state_dict(state: TrainState) -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "g": unwrap(state.g).state_dict(), "d": unwrap(state.d).state_dict(),
        "g_ema": state.g_ema.state_dict() if state.g_ema is not None else None,
        "opt_g": state.opt_g.state_dict(), "opt_d": state.opt_d.state_dict(),
        "scaler_g": state.scaler_g.state_dict(), "scaler_d": state.scaler_d.state_dict(),
        "step": state.step, "rng": rng, "d_steps": state.d_steps, "aug_p": state.aug.p,
        "r_t": [float(r) for r in state.r_t],
        "privacy": state.private.state_dict() if state.private is not None else None,
        "init_from": state.init_from,
    }


def load_state_dict(state: TrainState, sd: dict[str, Any], restore_rng: bool = True) -> None:
    unwrap(state.g).load_state_dict(sd["g"])
    unwrap(state.d).load_state_dict(sd["d"])
    if state.g_ema is not None:
        state.g_ema.load_state_dict(sd["g_ema"] if sd.get("g_ema") is not None else sd["g"])
    hyper = [[(k, g[k]) for k in ("lr", "betas")] for opt in (state.opt_g, state.opt_d) for g in opt.param_groups]
    state.opt_g.load_state_dict(sd["opt_g"])
    state.opt_d.load_state_dict(sd["opt_d"])
    # Adam's moments come from the checkpoint, its learning rate and betas from this run's config: a
    # resumed run (or a PBT member that copied another) may change them.
    for g, h in zip([g for opt in (state.opt_g, state.opt_d) for g in opt.param_groups], hyper):
        g.update(h)
    if sd.get("scaler_g"):
        state.scaler_g.load_state_dict(sd["scaler_g"])
        state.scaler_d.load_state_dict(sd["scaler_d"])
    state.step = int(sd["step"])
    state.d_steps = int(sd.get("d_steps", state.step))
    state.aug.p = float(sd.get("aug_p", state.aug.p))
    state.r_t = [torch.tensor(r) for r in sd.get("r_t", [])]
    if state.private is not None and sd.get("privacy"):
        state.private.load_state_dict(sd["privacy"])  # epsilon goes on from where it stood
    state.init_from = sd.get("init_from")
    if restore_rng:
        torch.set_rng_state(sd["rng"]["cpu"])
        if "cuda" in sd["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["rng"]["cuda"])


def fixed_noise(cfg: Config, n: int = GRID_SIZE):
    """The run's sample-grid noise: the same every checkpoint, so progress shows image to image."""
    z = latents(image_seeds(derive(cfg.train.seed, "grid"), n), cfg.model.latent_dim)
    y = torch.arange(n) % cfg.model.num_classes if cfg.model.conditional else None
    return z, y


def sample_grid(state: TrainState, cfg: Config) -> bytes:
    g = state.g_ema if state.g_ema is not None else unwrap(state.g)
    device = next(g.parameters()).device
    z, y = fixed_noise(cfg)
    x = generate(g, z.to(device), None if y is None else y.to(device))
    return png_bytes(grid(to_uint8(x), nrow=8))

