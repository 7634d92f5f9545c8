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

A DP run reports nothing computed on its training images (loss_d, d_real, ADA's r_t, the Poisson batch size
never reach progress lines, TensorBoard or checkpoints), and is scored only on a public dataset
(train.eval_dataset). Opacus is imported only by a DP run (its import costs about a second, and the GAN core
imports this module for every run). D must normalise per example
(BatchNorm mixes the images of a batch, so one image's influence could not be bounded): with DP, D has
LayerNorm and no spectral norm (Opacus has no per-example gradients for spectral norm's power iteration).
Losses with a gradient penalty (wgan-gp, R1) need double backward, which per-example gradients cannot do.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import Config, ConfigError, replace, same_images

# What every privacy statement carries: the mechanism and the accountant behind the epsilon, and what it covers.
ACCOUNTANT = "rdp"
COVERS = ("covering this run's use of its training images (D's DP-SGD steps; G, samples, scores on public "
          "data and the served model are post-processing), not a choice among several trials")


def started_from(init: dict[str, Any] | None) -> str:
    """What an epsilon statement adds for a run that started from another run's weights (aigc_ray.warmstart)."""
    if not init:
        return ""
    return (f"; the run started from the weights of {init['checkpoint']} (trained on {init['dataset']}, public "
            f"data, which epsilon does not cover): epsilon covers the fine-tuning only")


# The private recipe: what a DP run gets for each of these left at 0 (auto). Measured on Fashion-MNIST at
# epsilon 10 (docs/BENCHMARKS.md, "Quality against privacy"): only D sees private data, so D takes several
# steps per G step; a narrow D has fewer weights for the same noise std (the noise's norm grows with the
# square root of their number) and makes per-image gradients ~9x cheaper than D width 64; a larger expected
# batch divides the noise among more images.
RECIPE = {"loss.n_critic": 10, "train.batch_size": 128, "model.ndf": 16}


def recipe(cfg: Config) -> dict[str, Any]:
    """The private recipe's values for the settings this config leaves to auto (0); {} without DP."""
    if not cfg.privacy.enabled:
        return {}
    return {key: v for key, v in RECIPE.items() if not getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])}


def sample_rate(cfg: Config, size: int) -> float:
    """q: the chance that one training image is in a global D batch (batch_size x workers expected)."""
    return min(1.0, cfg.train.batch_size * max(1, cfg.train.num_workers) / size)


def d_steps(cfg: Config) -> int:
    return cfg.train.steps * max(1, cfg.loss.n_critic)


def _rdp_epsilon(history: list, delta: float) -> float:
    """Opacus' RDP accountant over a history of (sigma, q, steps): the epsilon spent at delta."""
    from opacus.accountants import RDPAccountant  # a DP run only, as every opacus import here

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


def solve_sigma(epsilon: float, delta: float, q: float, steps: int, spent: list | None = None) -> float:
    """The smallest sigma (to 0.01 in epsilon) whose `steps` steps at q, after the `spent` history of a resumed
    run ([(sigma, q, steps)]), bring the total to at most epsilon."""
    spent = list(spent or [])
    used = _rdp_epsilon(spent, delta)
    if used >= epsilon:
        raise ConfigError(f"privacy.epsilon: this run has already spent epsilon={used:.3f} of the {epsilon:g} asked "
                          f"for at delta={delta:g}; no further step fits: keep its checkpoint, or raise --dp-epsilon")
    if not spent:  # Opacus' own solver (the same bisection, from nothing spent)
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                                  steps=steps, accountant=ACCOUNTANT))
        except ValueError as e:
            raise ConfigError(f"privacy.epsilon: no noise multiplier reaches epsilon={epsilon:g} at delta={delta:g} "
                              f"in {steps} D steps at q={q:.4g} ({e}); raise --dp-epsilon or train fewer steps") from None

    def total(sigma: float) -> float:
        return _rdp_epsilon(spent + [(sigma, q, steps)], delta)

    lo, hi = 0.0, 10.0
    while total(hi) > epsilon:
        hi *= 2
        if hi > 1e6:
            raise ConfigError(f"privacy.epsilon: no noise multiplier keeps the {steps} remaining D steps within "
                              f"epsilon={epsilon:g} (already spent {used:.3f}); raise --dp-epsilon")
    while total(hi) < epsilon - 0.01:
        mid = (lo + hi) / 2
        if total(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def last_step_within(sigma: float, q: float, delta: float, epsilon: float, limit: int,
                     spent: list | None = None) -> int:
    """The most D steps (<= limit) at (sigma, q), after `spent`, whose total epsilon stays <= the target."""
    spent = list(spent or [])
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _rdp_epsilon(spent + ([(sigma, q, mid)] if mid else []), delta) <= epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


def spent_steps(spent: list | None) -> int:
    return int(sum(h[2] for h in spent or []))


def check_size(cfg: Config, size: int) -> None:
    """delta against the training images: it must be below 1/N (the rest of DP's settings, config.validate)."""
    p = cfg.privacy
    if p.enabled and size and not p.delta < 1 / size:
        raise ConfigError(f"privacy.delta: must be in (0, 1/N) with N = {size} training images "
                          f"(< {1 / size:.3g}), got {p.delta!r}")


def resolved(cfg: Config, size: int, spent: list | None = None) -> dict[str, Any]:
    """The overrides resolve makes for DP: D's normalisation, and sigma (from epsilon) or the step cap.
    spent: the accountant history of the checkpoint a run resumes from; epsilon then bounds the total."""
    check_size(cfg, size)
    if not cfg.privacy.enabled:
        return {}
    chosen = recipe(cfg)
    cfg = replace(cfg, chosen)
    p = cfg.privacy
    q = sample_rate(cfg, size)
    n_critic = max(1, cfg.loss.n_critic)
    done = spent_steps(spent)
    out: dict[str, Any] = {**chosen, "model.spectral_norm": False,
                           "model.d_norm": "layer" if cfg.model.d_norm == "auto" else cfg.model.d_norm}
    if p.noise_multiplier is None:  # epsilon alone: the sigma that spends what is left in the remaining steps
        remaining = d_steps(cfg) - done
        if remaining > 0:
            out["privacy.noise_multiplier"] = solve_sigma(p.epsilon, p.delta, q, remaining, spent)
        else:  # nothing left to train: the sigma it was trained with describes it
            out["privacy.noise_multiplier"] = float(spent[-1][0]) if spent else solve_sigma(p.epsilon, p.delta, q, 1)
    elif p.epsilon is not None:  # both: stop at the last step within epsilon
        more = last_step_within(p.noise_multiplier, q, p.delta, p.epsilon, max(0, d_steps(cfg) - done), spent)
        last = (done + more) // n_critic
        if last < 1 or (spent and more < 1 and done < d_steps(cfg)):
            raise ConfigError(f"privacy.epsilon: one more step at sigma={p.noise_multiplier:g}, q={q:.4g} would "
                              f"spend more than epsilon={p.epsilon:g}"
                              + (f" (this run has spent {_rdp_epsilon(spent, p.delta):.3f})" if spent else "")
                              + "; raise sigma or epsilon")
        out["train.steps"] = min(cfg.train.steps, last)
    return out


def describe(cfg: Config, size: int, spent: list | None = None, init: dict[str, Any] | None = None) -> str:
    """The line a DP run starts with: what is private, how, what was chosen for it, and what epsilon covers
    (init: the checkpoint a fine-tuned run starts from, aigc_ray.warmstart)."""
    p = cfg.privacy
    q = sample_rate(cfg, size)
    done = spent_steps(spent)
    history = list(spent or []) + ([(p.noise_multiplier, q, d_steps(cfg) - done)] if d_steps(cfg) > done else [])
    eps = _rdp_epsilon(history, p.delta)
    before = f" ({done} of them done before, at epsilon={_rdp_epsilon(spent, p.delta):.2f})" if done else ""
    return (f"[aigc_ray] DP-SGD on D (Opacus): sigma={p.noise_multiplier:.3f}, C={p.max_grad_norm:g}, "
            f"Poisson q={q:.4g} (expected batch {cfg.train.batch_size} per worker), {cfg.loss.n_critic} D steps "
            f"per G step, {d_steps(cfg)} D steps{before} -> epsilon={eps:.2f} at delta={p.delta:g}, {COVERS}"
            f"{started_from(init)}; D {cfg.model.ndf} wide with {cfg.model.d_norm} norm and no spectral norm "
            f"(per-example gradients)")


# ----------------------------------------------------------------------------------------------------
# Inside training: Poisson batches, the private D and its optimiser, the accountant.


def secret_seed(device="cpu") -> int:
    """64 bits of OS entropy for the DP noise and the Poisson sampling, the same on every worker of a
    torch.distributed group (worker 0 draws, the others receive it). It lives only in the workers' memory:
    it is never stored, logged or derived from train.seed, so nobody who knows the published seed (or
    anything else in the run's files) can replay the mechanism's randomness."""
    t = torch.tensor([secrets.randbits(63)], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return int(t.item())


class PoissonBatches:
    """Each D step: every image of the whole training set is in the global batch with probability q; this
    worker takes every world-th of them. The draws come from `seed`, which must be secret_seed()'s (the
    same on every worker, so they agree on the global batch); a resumed run draws a fresh one."""

    def __init__(self, data, q: float, seed: int, rank: int = 0, world: int = 1, start: int = 0, device="cpu"):
        self.data, self.q, self.rank, self.world = data, q, rank, world
        self.i, self.device = start, device
        self.per_epoch = max(1, round(1 / q))
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self):
        self.i += 1
        chosen = torch.nonzero(torch.rand(len(self.data), generator=self.g) < self.q).flatten()
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
    # The noise: a generator seeded from OS entropy (secret_seed; worker 0 adds it, see DistributedDPOptimizer),
    # and Opacus' secure_mode sum of four draws against the floating-point attack on Gaussian sampling.
    device = next(d.parameters()).device
    noise_rng = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    opt = cls(opt_d, noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
              expected_batch_size=cfg.train.batch_size, loss_reduction="mean", generator=noise_rng,
              secure_mode=True)
    acc = Private(sigma=p.noise_multiplier, q=sample_rate(cfg, size), delta=p.delta, max_grad_norm=p.max_grad_norm)
    return gsm, opt, acc


def guarantee(sd: dict[str, Any] | None, init: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What a checkpoint's privacy state says, for best.json, /info and the report ({} keys, or None). init: the
    checkpoint a fine-tuned run started from (aigc_ray.warmstart), which epsilon does not cover."""
    if not sd:
        return None
    out = {"epsilon": round(float(sd["epsilon"]), 4), "delta": sd["delta"], "noise_multiplier": sd["sigma"],
           "max_grad_norm": sd["max_grad_norm"], "sample_rate": sd["q"], "accountant": sd["accountant"],
           "d_steps": int(sum(h[2] for h in sd["history"])), "history": [list(h) for h in sd["history"]],
           "covers": COVERS + started_from(init)}
    if init:
        out["init_from"] = init
    return out


def history_of(guaranteed: dict[str, Any]) -> list:
    """The accountant history [(sigma, q, steps)] a checkpoint's privacy statement holds."""
    if guaranteed.get("history"):
        return [tuple(h) for h in guaranteed["history"]]
    return [(guaranteed["noise_multiplier"], guaranteed["sample_rate"], guaranteed["d_steps"])]


def resume_history(cfg: Config, latest_meta: dict[str, Any] | None) -> list | None:
    """What a resumed run has already spent; one line if the resume would make its epsilon untrue: DP flags on
    a run trained without DP (its first steps were not private), or a DP run continued without DP."""
    if latest_meta is None:
        return None
    was = latest_meta.get("privacy")
    if cfg.privacy.enabled and not was:
        raise ConfigError(f"privacy: run {cfg.run.name!r} was trained without DP up to step {latest_meta['step']}; "
                          "no epsilon can cover those steps: train a new --name with the DP flags")
    if was and not cfg.privacy.enabled:
        raise ConfigError(f"privacy: run {cfg.run.name!r} is a DP run (epsilon={was['epsilon']:.2f}); continuing it "
                          "without --dp-epsilon/--dp-noise-multiplier would leave its epsilon untrue")
    return history_of(was) if was else None


def search_privacy(histories: dict[str, list], winner: str, delta: float, ranked_by: str) -> dict[str, Any]:
    """What a search over DP trials guarantees: every trial trained on the private images, so the winner,
    chosen among them by a score on public data (post-processing of their joint release), is covered by the
    composition of all their histories, not by its own epsilon alone."""
    total = _rdp_epsilon([tuple(h) for hist in histories.values() for h in hist], delta)
    n = len(histories)
    return {"trials": n, "winner": winner, "epsilon_all_trials": round(total, 4), "ranked_by": ranked_by,
            "histories": {k: [list(h) for h in v] for k, v in histories.items()},
            "statement": f"chosen among {n} DP trials by {ranked_by}; the choice and the winner together are "
                         f"covered by epsilon={total:.2f} at delta={delta:g}, all {n} trials composed"}


def continued(final: dict[str, Any] | None, searched: dict[str, Any] | None) -> dict[str, Any] | None:
    """The statement of a search's winner trained on (the pipeline): its own history now runs longer, so the
    search's composition is made again with it."""
    if not final or not (searched and searched.get("search")):
        return final
    s = searched["search"]
    histories = {**s["histories"], s["winner"]: history_of(final)}
    return {**final, "search": search_privacy(histories, s["winner"], final["delta"], s["ranked_by"])}


def public_metric(cfg: Config, metric: str) -> str:
    """metric, or fid where fid-domain's classifier would be trained on this DP run's private images."""
    same = cfg.train.eval_dataset and same_images(cfg.train.eval_dataset, cfg.data.dataset)
    return "fid" if metric == "fid-domain" and same else metric
