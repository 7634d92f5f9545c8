"""Differentially private training of D with DP-SGD (Opacus), data-parallel on Ray Train.

    aigc-ray train --dp-noise-multiplier 1.1 --dp-max-grad-norm 1.0      # sigma given; epsilon reported
    aigc-ray train --dp-epsilon 10 --dp-delta 1e-5                       # sigma solved for train.steps
    aigc-ray train --dp-noise-multiplier 1.1 --dp-epsilon 3              # stop before epsilon passes 3

Only D touches the training images, so only D's updates are privatised: every D step draws a Poisson
sample of the training set (each image with probability q), clips each image's gradient to
max_grad_norm (C), adds Gaussian noise of std sigma * C once per global step (on worker 0 only; the
workers' clipped sums are then all-reduced), and Opacus' RDP accountant adds the step to epsilon at
delta. G sees the data only through D, so it is private by post-processing; so is everything made from
G (samples, FID, the served model).

What this does not cover: the loss and d_real values in progress lines and TensorBoard are computed on
training images and are not privatised; eval metrics use the test split. D must normalise per example
(BatchNorm mixes the images of a batch, so one image's influence could not be bounded): with DP, D has
LayerNorm and no spectral norm (Opacus has no per-example gradients for spectral norm's power iteration).
Losses with a gradient penalty (wgan-gp, R1) need double backward, which per-example gradients cannot do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError

# What every privacy statement carries: the mechanism and the accountant behind the epsilon.
ACCOUNTANT = "rdp"


def enabled(cfg: Config) -> bool:
    p = cfg.privacy
    return p.noise_multiplier is not None or p.epsilon is not None


def sample_rate(cfg: Config, size: int) -> float:
    """q: the chance that one training image is in a global D batch (batch_size x workers expected)."""
    return min(1.0, cfg.train.batch_size * max(1, cfg.train.num_workers) / size)


def d_steps(cfg: Config) -> int:
    return cfg.train.steps * max(1, cfg.loss.n_critic)


def _rdp_epsilon(history: list, delta: float) -> float:
    """Opacus' RDP accountant over a history of (sigma, q, steps): the epsilon spent at delta."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a loose bound, still a bound
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


def epsilon_after(sigma: float, q: float, steps: int, delta: float) -> float:
    """The epsilon at delta that Opacus' RDP accountant gives for `steps` steps of (sigma, q)."""
    return _rdp_epsilon([(sigma, q, steps)] if steps > 0 else [], delta)


def solve_sigma(epsilon: float, delta: float, q: float, steps: int) -> float:
    """The smallest sigma (to Opacus' 0.01 tolerance) whose `steps` steps at q spend at most epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                              accountant=ACCOUNTANT))
    except ValueError as e:
        raise ConfigError(f"privacy.epsilon: no noise multiplier reaches epsilon={epsilon:g} at delta={delta:g} "
                          f"in {steps} D steps at q={q:.4g} ({e}); raise --dp-epsilon or train fewer steps") from None


def last_step_within(sigma: float, q: float, delta: float, epsilon: float, limit: int) -> int:
    """The most D steps (<= limit) whose epsilon stays <= the target (RDP composes linearly in steps)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_after(sigma, q, mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check(cfg: Config, size: int) -> None:
    """DP settings a user can get wrong, as one line each; size (training images, 0: not known yet) bounds
    delta. validate calls it without the size, resolve with it."""
    p, lo, m = cfg.privacy, cfg.loss, cfg.model
    if p.noise_multiplier is not None and not p.noise_multiplier > 0:
        raise ConfigError(f"privacy.noise_multiplier: must be > 0, got {p.noise_multiplier!r}")
    if p.epsilon is not None and not p.epsilon > 0:
        raise ConfigError(f"privacy.epsilon: must be > 0, got {p.epsilon!r}")
    if not enabled(cfg):
        return
    if not p.max_grad_norm > 0:
        raise ConfigError(f"privacy.max_grad_norm: must be > 0, got {p.max_grad_norm!r}")
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta: must be in (0, 1), got {p.delta!r}")
    if size and not p.delta < 1 / size:
        raise ConfigError(f"privacy.delta: must be in (0, 1/N) with N = {size} training images "
                          f"(< {1 / size:.3g}), got {p.delta!r}")
    if lo.name == "wgan-gp" or lo.r1_weight:
        raise ConfigError("privacy: DP-SGD needs per-example gradients, which a gradient penalty (wgan-gp, R1) "
                          "cannot give; use --loss bce|hinge|lsgan and --r1-weight 0")
    if m.d_norm == "batch":
        raise ConfigError("model.d_norm: BatchNorm mixes the images of a batch, so DP cannot bound one image's "
                          "influence; use layer or none (auto picks layer with DP)")
    if cfg.augment.adaptive:
        raise ConfigError("augment.adaptive: ADA steers p by D's outputs on training images, which DP does not "
                          "privatise; use a fixed --aug-p with DP")
    if cfg.train.amp == "fp16":
        raise ConfigError("train.amp: fp16's loss scaling is not supported with DP; use bf16 or none")


def resolved(cfg: Config, size: int) -> dict[str, Any]:
    """The overrides resolve makes for DP: D's normalisation, and sigma (from epsilon) or the step cap."""
    check(cfg, size)
    if not enabled(cfg):
        return {}
    p = cfg.privacy
    q = sample_rate(cfg, size)
    out: dict[str, Any] = {"model.spectral_norm": False,
                           "model.d_norm": "layer" if cfg.model.d_norm == "auto" else cfg.model.d_norm}
    if p.noise_multiplier is None:  # epsilon alone: the sigma that spends it in exactly train.steps
        out["privacy.noise_multiplier"] = solve_sigma(p.epsilon, p.delta, q, d_steps(cfg))
    elif p.epsilon is not None:  # both: stop at the last step within epsilon
        n_critic = max(1, cfg.loss.n_critic)
        last = last_step_within(p.noise_multiplier, q, p.delta, p.epsilon, d_steps(cfg)) // n_critic
        if last < 1:
            raise ConfigError(f"privacy.epsilon: one step at sigma={p.noise_multiplier:g}, q={q:.4g} already "
                              f"spends more than epsilon={p.epsilon:g}; raise sigma or epsilon")
        out["train.steps"] = min(cfg.train.steps, last)
    return out


def describe(cfg: Config, size: int) -> str:
    """The line a DP run starts with: what is private, how, and what was chosen for it."""
    p = cfg.privacy
    q = sample_rate(cfg, size)
    eps = epsilon_after(p.noise_multiplier, q, d_steps(cfg), p.delta)
    return (f"[aigc_ray] DP-SGD on D (Opacus): sigma={p.noise_multiplier:.3f}, C={p.max_grad_norm:g}, "
            f"Poisson q={q:.4g}, {d_steps(cfg)} D steps -> epsilon={eps:.2f} at delta={p.delta:g}; "
            f"D with {cfg.model.d_norm} norm and no spectral norm (per-example gradients)")


# ----------------------------------------------------------------------------------------------------
# Inside training: Poisson batches, the private D and its optimiser, the accountant.


class PoissonBatches:
    """Each D step: every image of the whole training set is in the global batch with probability q
    (seeded by the step, the same draw on every worker); this worker takes every world-th of them.
    Batch i depends only on (seed, i), so a resumed run continues the exact sequence."""

    def __init__(self, data, q: float, seed: int, rank: int = 0, world: int = 1, start: int = 0, device="cpu"):
        self.data, self.q, self.seed, self.rank, self.world = data, q, seed, rank, world
        self.i, self.device = start, device
        self.per_epoch = max(1, round(1 / q))

    def __call__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.i)
        self.i += 1
        chosen = torch.nonzero(torch.rand(len(self.data), generator=g) < self.q).flatten()
        return self.data.batch(chosen[self.rank::self.world], self.device)


@dataclass
class Private:
    """The accountant of a DP run, and the constants it composes."""

    sigma: float
    q: float
    delta: float
    max_grad_norm: float
    history: list = field(default_factory=list)  # Opacus RDP history: [(sigma, q, steps)]

    def step(self) -> None:
        if self.history and self.history[-1][:2] == (self.sigma, self.q):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + 1)
        else:
            self.history.append((self.sigma, self.q, 1))

    def epsilon(self) -> float:
        return _rdp_epsilon(self.history, self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "q": self.q, "delta": self.delta, "max_grad_norm": self.max_grad_norm,
                "accountant": ACCOUNTANT, "history": [list(h) for h in self.history],
                "epsilon": self.epsilon()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in sd.get("history", [])]


def make_private(d: nn.Module, opt_d: torch.optim.Optimizer, cfg: Config, size: int):
    """D wrapped for per-example gradients, its optimiser clipping and noising them (once across workers
    when torch.distributed runs), and the accountant. `size`: training images (for q)."""
    import torch.distributed as dist
    from opacus import GradSampleModule
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    # Opacus' hooks on a D whose input needs no gradient (real images) make torch say so every step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    p = cfg.privacy
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:  # the same starting D everywhere (no DDP on D: the DP optimiser all-reduces itself)
        for t in list(d.parameters()) + list(d.buffers()):
            dist.broadcast(t.data, src=0)
    gsm = GradSampleModule(d, loss_reduction="sum")
    cls = DistributedDPOptimizer if distributed else DPOptimizer
    opt = cls(opt_d, noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
              expected_batch_size=cfg.train.batch_size, loss_reduction="mean")
    acc = Private(sigma=p.noise_multiplier, q=sample_rate(cfg, size), delta=p.delta, max_grad_norm=p.max_grad_norm)
    return gsm, opt, acc


def guarantee(sd: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a checkpoint's privacy state says, for best.json, /info and the report ({} keys, or None)."""
    if not sd:
        return None
    return {"epsilon": round(float(sd["epsilon"]), 4), "delta": sd["delta"], "noise_multiplier": sd["sigma"],
            "max_grad_norm": sd["max_grad_norm"], "sample_rate": sd["q"], "accountant": sd["accountant"],
            "d_steps": int(sum(h[2] for h in sd["history"]))}
