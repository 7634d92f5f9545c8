"""Data-parallel GAN training: a Ray-free train step, the per-worker Ray Train loop, and the driver.

    aigc-ray train --dataset fashion-mnist --loss wgan-gp --num-workers 2 --steps 2000 --name fm-wgan

Each of N workers holds its own shard of the data and a DDP-wrapped G and D; the global batch is
train.batch_size x N. Every train.log_every steps (at most once per REPORT_EVERY_S) the workers report
step, images seen, images/s and losses (averaged over workers); every train.ckpt_every steps rank 0 also
writes a checkpoint with a sample grid. Running the same run name again resumes from its latest checkpoint, and a dead
worker restarts the group from the last checkpoint (train.max_failures times).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from . import data as data_mod
from . import privacy, storage
from .config import Config, ConfigError, RunError, replace, resolve, validate
from .images import grid, png_bytes, to_uint8
from .augment import Augment
from .losses import LOSSES, per_example_d, r1_penalty
from .models import build, generate
from .seeds import derive, image_seeds, latents

GRID_SIZE = 64
R1_EVERY = 16  # lazy R1 (StyleGAN2): every 16th D update, weighted 16x
# Ray Train's controller takes one report per worker every 2 s (its health-check poll) and a worker
# reporting faster waits for it: on a GPU, where 50 steps take a fraction of a second, reporting every
# log_every steps ran at a tenth of the plain loop's speed. Workers report at most this often instead
# (checkpoints and evaluations always), deciding together from their mean clock.
REPORT_EVERY_S = 2.5
ADA_INTERVAL = 4  # D steps between moves of the adaptive augmentation strength (ADA's)
PRIVATE_STATS = ("loss_d", "d_real", "r_t", "r1")  # computed on training images: a DP run never reports them


class TrainingFailed(RunError):
    """A run failed more often than train.max_failures allows; the message says where it can resume."""


# ----------------------------------------------------------------------------------------------------
# The train step: plain PyTorch, no Ray. Runs on one CPU in a unit test and inside every Ray worker.


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
    if privacy.enabled(cfg):
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
        with amp:
            if private:
                loss_d, d_stats = per_example_d(d, real, aug(fake.detach()), y, y_fake, cfg.loss)
            else:
                loss_d, d_stats = d_loss_fn(d, real, aug(fake.detach()), y, cfg.loss)
        state.d_steps += 1
        if cfg.loss.r1_weight and state.d_steps % R1_EVERY == 0:
            r1 = r1_penalty(d, real, y)
            loss_d = loss_d + cfg.loss.r1_weight / 2 * R1_EVERY * r1
            d_stats["r1"] = r1.detach()
        state.opt_d.zero_grad(set_to_none=True)
        state.scaler_d.scale(loss_d).backward()
        state.scaler_d.step(state.opt_d)
        state.scaler_d.update()
        if private:
            private.step()
            loss_d = loss_d / (real.shape[0] + n_fake)  # logged as a mean, like the other losses

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


# ----------------------------------------------------------------------------------------------------
# Progress and TensorBoard: called by the driver-side callback, or by the loop in local mode.


def progress_line(m: dict[str, Any], total: int, layout: str = "") -> str:
    extra = f" W={m['wasserstein']:.3f}" if "wasserstein" in m else ""
    evals = "".join(f" {k}={m[k]:.2f}" for k in ("fid", "fid_domain") if k in m)
    extra += f" aug p={m['aug_p']:.2f}" if "aug_p" in m else ""
    extra += f" eps={m['epsilon']:.2f} (delta {m['delta']:g}, this run's D steps)" if "epsilon" in m else ""
    loss_d = f"loss_d={m['loss_d']:.3f}" if "loss_d" in m else "loss_d=private"
    return (f"[aigc_ray] step {m['step']}/{total} ({100 * m['step'] / total:.0f}%) "
            f"{loss_d} loss_g={m['loss_g']:.3f}{extra}{evals} "
            f"{m['images_per_s']:.0f} img/s, {m['images_seen']} images seen" + (f", {layout}" if layout else ""))


def _print(line: str) -> None:
    print(line, flush=True)


class Logger:
    """Says a progress line per report (say: print, a line relay's put, or None) and writes the same metrics
    as TensorBoard events under <run>/tensorboard.

    On an object store the events are written to a local folder and published after every flush."""

    def __init__(self, run_dir: str | None, total_steps: int, say: Callable[[str], Any] | None = None,
                 layout: str = ""):
        self.run_dir, self.total, self.say, self.layout = run_dir, total_steps, say, layout
        self._writer = self._local = None

    def log(self, metrics: dict[str, Any]) -> None:
        if self.say is not None:
            self.say(progress_line(metrics, self.total, self.layout))
        if not self.run_dir:
            return
        tb = storage.join(self.run_dir, "tensorboard")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._local = tempfile.mkdtemp(prefix="aigc_tb_") if storage.is_remote(tb) else tb
            self._writer = SummaryWriter(self._local)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "step":
                self._writer.add_scalar(k, v, metrics["step"])
        self._writer.flush()
        if storage.is_remote(tb):
            storage.publish_dir(self._local, tb)


def _progress_callback(run_dir: str, total: int, lines, layout: str = ""):
    from ray.train import UserCallback

    class Progress(UserCallback):
        """Runs on the Ray Train controller: one line per report (into the driver's relay), and TensorBoard
        events."""

        def __init__(self):
            self.logger = Logger(run_dir, total, lines.put if lines is not None else None, layout)

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                self.logger.log(metrics[0])

    return Progress()


# ----------------------------------------------------------------------------------------------------
# The per-worker loop: plain PyTorch plus the marked Ray Train steps.


def worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = validate(Config.from_dict(config["cfg"]))
    local, run_dir = config["local"], config["run_dir"]
    t = cfg.train
    # [1] Where this worker stands: rank, world size, device.
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    torch.set_num_threads(t.cpus_per_worker)

    # [2] The images (and the scoring reference) from Ray's object store: one copy per node, shared by
    #     its workers, whatever this node has on its own disk.
    inputs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in config["inputs"].items()}
    data = data_mod.ImageSet.from_numpy(inputs["data"])
    size = len(data)
    if not privacy.enabled(cfg):  # DP samples from the whole set (Poisson), each worker taking its share
        data = data.shard(rank, world)

    # [3] DDP-wrap G and D. No buffer sync in forward: D is called on real and fake images before one
    #     backward, and a buffer broadcast between those calls breaks autograd (BatchNorm stats).
    def wrap(m):
        return ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"forward_sync_buffers": False})

    state = build_state(cfg, device, wrap=wrap if not local else (lambda m: m), size=size)

    # [4] Resume from the latest checkpoint of this run (a re-run of the same name, or a restart).
    resume = _latest(run_dir, local)
    if resume is not None:
        load_state_dict(state, ckpt.load(resume, map_location=device), restore_rng=rank == 0)
        if rank == 0 and config["lines"] is not None:  # to the driver's relay: a restart says where it went on
            config["lines"].put(f"[aigc_ray] worker group of {cfg.run.name} continues at step {state.step} "
                                f"({resume})")
        if rank != 0:  # rank 0 took its RNG state from the checkpoint
            torch.manual_seed(derive(t.seed, "worker", rank, state.step))
    else:
        torch.manual_seed(derive(t.seed, "worker", rank, 0))
    if state.private is not None:
        # DP's sampling: a secret seed from OS entropy, shared by the workers, never from train.seed.
        batches = privacy.PoissonBatches(data, state.private.q, seed=privacy.secret_seed(device), rank=rank,
                                         world=world, start=state.step * cfg.loss.n_critic, device=device)
    else:
        batches = data_mod.Batches(data, t.batch_size, seed=t.seed, rank=rank,
                                   start=state.step * cfg.loss.n_critic, device=device)
    logger = Logger(run_dir, t.steps, _print if config["echo"] else None, layout(cfg)) if local else None

    window: dict[str, torch.Tensor] = {}
    n_window, t0 = 0, time.perf_counter()
    while state.step < t.steps:
        stats = train_step(state, batches, cfg)
        for k, v in stats.items():
            window[k] = window.get(k, 0) + v
        n_window += 1
        s = state.step
        is_ckpt = s % t.ckpt_every == 0 or s == t.steps
        is_eval = bool(t.eval_every) and (s % t.eval_every == 0 or s == t.steps)
        if not (s % t.log_every == 0 or is_ckpt or is_eval):
            continue
        # Average the window's stats over steps and workers, and the seconds since the last report over
        # workers (one small all-reduce): every worker then makes the same choice to report or not.
        keys = sorted(window)
        now = time.perf_counter()
        elapsed = now - t0  # windows tile the run: each one holds the previous report's own cost
        vec = torch.cat([torch.stack([window[k] for k in keys]).float() / n_window,
                         torch.tensor([elapsed], device=window[keys[0]].device)])
        if world > 1 and dist.is_initialized():
            dist.all_reduce(vec)
            vec /= world
        *means, mean_elapsed = vec.tolist()
        if not (local or is_ckpt or is_eval or mean_elapsed >= REPORT_EVERY_S):
            continue  # the window grows until the next log point that is due
        metrics = {k: float(v) for k, v in zip(keys, means)}
        metrics.update(step=s, images_seen=s * cfg.loss.n_critic * t.batch_size * world,
                       # over the workers' mean window, the clock the choice to report was made on
                       images_per_s=n_window * cfg.loss.n_critic * t.batch_size * world / mean_elapsed,
                       epoch=batches.i // batches.per_epoch)
        if state.private is not None:
            metrics.update(epsilon=state.private.epsilon(), delta=state.private.delta)
        checkpoint, marker = None, None
        if is_eval:  # every worker generates its share; the statistics are all-reduced
            metrics.update(_evaluate(state, cfg, inputs["eval"], rank, world, device))
        name = f"checkpoint_{s:08d}"
        if is_ckpt and rank == 0:
            files = ckpt.encode(state=state_dict(state), cfg=cfg, grid_png=sample_grid(state, cfg), metrics=metrics)
            if local:  # no Ray storage in local mode: the folder and its pruning are ours
                ckpt.write(storage.join(run_dir, name), files)
                _prune(run_dir, t.keep_checkpoints)
            else:  # files straight to storage; Ray copies the marker (meta.json) last and registers the folder
                marker = Path(tempfile.mkdtemp(prefix="aigc_ckpt_"))
                (marker / ckpt.META_FILE).write_bytes(files.pop(ckpt.META_FILE))
                ckpt.write(storage.join(run_dir, name), files)
                checkpoint = ray.train.Checkpoint.from_directory(str(marker))
        if logger:
            logger.log(metrics)
        # [5] Report metrics (a barrier: every worker calls it) and rank 0's checkpoint.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        if marker is not None:
            shutil.rmtree(marker, ignore_errors=True)
        window, n_window, t0 = {}, 0, now


def _evaluate(state: TrainState, cfg: Config, ref: dict, rank: int, world: int, device) -> dict[str, float]:
    """The configured metric on G_ema, each worker generating its share of the samples."""
    from . import metrics as metrics_mod

    g = state.g_ema if state.g_ema is not None else unwrap(state.g)
    return metrics_mod.evaluate_in_training(g, cfg, ref, rank=rank, world=world, device=device)


def _latest(run_dir: str, local: bool) -> str | None:
    """The checkpoint to resume from: the newest complete one in the run's folder, or Ray's latest if newer.

    A node can die after a checkpoint is whole in storage but before Ray registered its report: that
    checkpoint still counts, so a restart loses no more than ckpt_every steps."""
    import ray.train

    found = []
    if not local and (c := ray.train.get_checkpoint()) is not None:
        found.append(storage.join(run_dir, storage.name(c.path)))
    try:
        found.append(ckpt.find(run_dir))
    except ckpt.CheckpointError:
        pass
    return max(found, key=lambda d: ckpt.read_meta(d)["step"]) if found else None


def _prune(run_dir: str, keep: int) -> None:
    """Local mode: keep the newest `keep` complete checkpoints of the run (0: all)."""
    if keep:
        done = sorted(d for d, _ in ckpt.complete_checkpoints(run_dir) if storage.parent(d) == run_dir)
        for old in done[:-keep]:
            storage.delete(old)


# ----------------------------------------------------------------------------------------------------
# The driver.


def check_inputs(cfg: Config) -> None:
    """Before Ray starts: the storage can be written (bucket, credentials, endpoint) and the dataset is there;
    a DP run's delta fits its data, and resuming it keeps its epsilon true."""
    storage.check(cfg.run.storage)
    data_mod.ensure(cfg.data)
    spent = spent_privacy(cfg)
    if privacy.enabled(cfg):  # delta against the training images; sigma or the step cap within what is left
        privacy.resolved(cfg, data_mod.size(cfg.data), spent)


def make_inputs(cfg: Config, local: bool = False) -> dict[str, Any]:
    """What every worker needs, made once by the driver: the training images and, with train.eval_every,
    the scoring reference. Put in Ray's object store (unless local), so workers on any node read them
    from there, one copy per node, and no worker looks for a dataset or a cache on its own disk."""
    import ray

    from . import metrics

    inputs: dict[str, Any] = {"data": data_mod.load(cfg.data, "train").to_numpy()}
    if cfg.train.eval_every:
        inputs["eval"] = metrics.training_reference(cfg)
    return inputs if local else {k: ray.put(v) for k, v in inputs.items()}


def check_cluster(cfg: Config) -> None:
    """Ask for no more workers than the cluster can ever place: Ray would wait for them forever."""
    import ray

    t = cfg.train
    if t.num_workers == 0:
        return
    res = ray.cluster_resources()
    need, have = t.num_workers * t.cpus_per_worker, res.get("CPU", 0)
    autoscaling = bool(os.environ.get("AIGC_RAY_AUTOSCALING"))
    if need > have and not autoscaling:
        raise ConfigError(f"train.num_workers: {t.num_workers} workers x {t.cpus_per_worker} CPUs need {need:g} "
                          f"CPUs, the cluster has {have:g}; lower --num-workers (or set AIGC_RAY_AUTOSCALING=1 "
                          "on an autoscaling cluster)")
    if t.use_gpu and t.num_workers > res.get("GPU", 0) and not autoscaling:
        raise ConfigError(f"train.use_gpu: {t.num_workers} GPU workers, the cluster has {res.get('GPU', 0):g} GPUs")


def _say_resume(cfg: Config, run_dir: str) -> None:
    """A run that continues says so first, with the step and the checkpoint it continues from."""
    try:
        latest = ckpt.find(run_dir)
    except ckpt.CheckpointError:
        return
    step = ckpt.read_meta(latest)["step"]
    if step >= cfg.train.steps:
        print(f"[aigc_ray] {cfg.run.name} is already at step {step} of {cfg.train.steps} ({latest})", flush=True)
    else:
        print(f"[aigc_ray] resuming {cfg.run.name} from step {step} (checkpoint {latest})", flush=True)


def plan_workers(num_workers: int, cpus_per_worker: int, use_gpu: bool, nodes: list[dict[str, float]],
                 concurrent: int = 1) -> tuple[int, int]:
    """Concrete (workers, CPUs per worker) for 'auto' values (-1 workers, 0 CPUs), for `concurrent` runs
    sharing the cluster whose alive nodes hold `nodes` resources ({"CPU": 2, "GPU": 0}).

    Auto workers: one per GPU on GPUs, else one per node with CPUs (inside a node, torch threads beat
    DDP between processes). Auto CPUs: the most per worker such that every worker of every run still
    fits on some node, so Ray never waits for a placement the cluster cannot give.
    """
    concurrent = max(1, concurrent)
    cpu_nodes = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1]
    if num_workers < 0:
        gpus = int(sum(n.get("GPU", 0) for n in nodes))
        num_workers = max(1, (gpus if use_gpu and gpus else len(cpu_nodes)) // concurrent)
    if cpus_per_worker <= 0:
        need = num_workers * concurrent
        fits = [c for c in range(1, max(cpu_nodes, default=1) + 1) if sum(n // c for n in cpu_nodes) >= need]
        cpus_per_worker = max(fits, default=1)
    return num_workers, cpus_per_worker


def layout(cfg: Config) -> str:
    """How a resolved run uses the machine, as the progress lines say it: '1 worker x 2 threads'."""
    t = cfg.train
    workers = "in-process" if t.num_workers == 0 else f"{t.num_workers} worker{'s' * (t.num_workers > 1)}"
    return f"{workers} x {t.cpus_per_worker} thread{'s' * (t.cpus_per_worker > 1)}" + (" + GPU" if t.use_gpu else "")


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def prepare(cfg: Config, concurrent: int = 1) -> Config:
    """Validate and resolve 'auto' values (channels, classes, GPU, AMP, workers and threads, name)
    against the data and the cluster; `concurrent` runs will share the cluster (a search)."""
    import ray

    cfg = validate(cfg)
    channels, num_classes = data_mod.info(cfg.data)
    t = cfg.train
    use_gpu = t.use_gpu
    if use_gpu is None:
        use_gpu = (ray.cluster_resources().get("GPU", 0) > 0) if t.num_workers else torch.cuda.is_available()
    if t.num_workers == 0:  # this process: its own CPUs
        workers, cpus = 0, t.cpus_per_worker or len(os.sched_getaffinity(0))
    else:
        workers, cpus = plan_workers(t.num_workers, t.cpus_per_worker, use_gpu, alive_nodes(), concurrent)
    cfg = replace(cfg, {"train.num_workers": workers, "train.cpus_per_worker": cpus})
    return resolve(cfg, channels=channels, num_classes=num_classes, use_gpu=use_gpu, size=data_mod.size(cfg.data),
                   spent=spent_privacy(cfg), class_names=data_mod.class_names(cfg.data),
                   people=data_mod.is_people(cfg.data))


def _latest_meta(cfg: Config) -> dict[str, Any] | None:
    """meta.json of the checkpoint a run of this name would resume from; None for a new run."""
    if not cfg.run.name:
        return None
    try:
        return ckpt.read_meta(ckpt.find(run_dir_of(cfg)))
    except ckpt.CheckpointError:
        return None


def spent_privacy(cfg: Config) -> list | None:
    """The DP accountant history the run resumes with (None: a new or non-DP run); refuses a resume whose
    epsilon would be untrue."""
    return privacy.resume_history(cfg, _latest_meta(cfg))


def run_dir_of(cfg: Config) -> str:
    return storage.join(storage.normalize(cfg.run.storage), cfg.run.name)


def _check_resumable(cfg: Config, run_dir: str) -> None:
    """A re-run may change how long and how fast it trains, not what it trains."""
    saved = storage.join(run_dir, ckpt.CONFIG_FILE)
    if not storage.exists(saved):
        return
    old = json.loads(storage.read_text(saved))
    new = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples (class names) are JSON lists
    for section in ("data", "model", "loss"):
        for k, v in new[section].items():
            if k in ("cache", "root", "download"):  # where data comes from, not what it is
                continue
            if old.get(section, {}).get(k, v) != v:
                raise ConfigError(f"run {cfg.run.name!r} exists with {section}.{k}={old[section][k]!r}, "
                                  f"not {v!r}: resume it unchanged or pick a new --name")


def fit(cfg: Config, *, callbacks: list | None = None, quiet: bool = False, verbose: bool = False,
        keep_best_by: str | None = None, driver_cpus: float = 0.0, inputs: dict | None = None) -> dict[str, Any]:
    """Train (or resume) the run cfg.run.name; returns its final metrics and latest checkpoint path.

    keep_best_by: a metric (e.g. "fid_domain") by which Ray keeps the best checkpoints, not the newest.
    driver_cpus: CPUs the caller (a Tune trial) already holds; taken off the workers' request so that
    trial + workers ask for exactly num_workers x cpus_per_worker and concurrent trials fit the cluster.
    inputs: make_inputs(cfg) made by a caller that shares them between runs (a search); else made here.
    verbose: Ray Train's own INFO lines too (worker group started, every checkpoint persisted); else our
    progress lines say what happened, once.
    """
    cfg = prepare(cfg)
    t, run_dir = cfg.train, run_dir_of(cfg)
    if not verbose:  # in-process (local) runs: Ray Train's INFO lines come from this process's own logger
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    _check_resumable(cfg, run_dir)
    local = t.num_workers == 0
    check_cluster(cfg)
    if inputs is None:
        inputs = make_inputs(cfg, local)  # a dataset or reference that cannot be had fails here, before a write
    storage.write_text(storage.join(run_dir, ckpt.CONFIG_FILE), json.dumps(cfg.to_dict(), indent=2))
    if not quiet:
        _say_resume(cfg, run_dir)
        if data_mod.is_people(cfg.data) and cfg.model.conditional:
            print(f"[aigc_ray] {cfg.data.dataset}: {cfg.model.num_classes} people, so the defaults for faces: "
                  f"identity-conditional (one label per person: sample --class NAME gives their double), "
                  f"augmentation {cfg.augment.policy}", flush=True)
        if privacy.enabled(cfg):
            print(privacy.describe(cfg, data_mod.size(cfg.data), spent_privacy(cfg)), flush=True)
    with _relayed_lines(enabled=not (quiet or local)) as lines:
        cbs = list(callbacks or [])
        if not local:
            cbs.append(_progress_callback(run_dir, t.steps, lines, layout=layout(cfg)))
        result = _run_trainer(cfg, run_dir, cbs, verbose, keep_best_by, driver_cpus,
                              {"cfg": cfg.to_dict(), "local": local, "run_dir": run_dir, "echo": not quiet,
                               "lines": lines, "inputs": inputs})
    if result.checkpoint is not None:
        latest = storage.join(run_dir, storage.name(result.checkpoint.path))
    else:
        latest = ckpt.find(run_dir)
    meta = ckpt.read_meta(latest)
    metrics = {**meta.get("metrics", {}), **(result.metrics or {})}
    return {"checkpoint": latest, "run_dir": run_dir, "step": metrics.get("step", meta.get("step")),
            "images_per_s": metrics.get("images_per_s"), "loss_d": metrics.get("loss_d"),
            "loss_g": metrics.get("loss_g"), "grid": storage.join(latest, ckpt.GRID_FILE),
            **{k: v for k, v in metrics.items() if k in ("fid", "fid_domain", "wasserstein")}}


@contextmanager
def _relayed_lines(enabled: bool):
    """A queue on this driver's node into which the Train controller and rank 0 put their lines, and a thread
    that prints them here. Our lines then reach the driver without Ray's log forwarding, so a command can run
    with log_to_driver=False (Ray's own chatter, Serve's start-up banner, behind --verbose) and still say
    every step. On the driver's node, the queue outlives the loss of any worker node."""
    if not enabled:
        yield None
        return
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def pump():
        while (line := queue.get()) is not None:
            print(line, flush=True)

    printer = threading.Thread(target=pump, daemon=True)
    printer.start()
    try:
        yield queue
    finally:
        queue.put(None)  # after every line the run put: all are printed before fit returns
        printer.join(timeout=60)
        queue.shutdown()


def _run_trainer(cfg: Config, run_dir: str, callbacks: list, verbose: bool, keep_best_by: str | None,
                 driver_cpus: float, loop_config: dict[str, Any]):
    """Ray Train's TorchTrainer for the run, fitted; a run out of restarts ends in one TrainingFailed line."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker - driver_cpus /
                                                                     max(1, t.num_workers)}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            **storage.ray_storage(storage.parent(run_dir)),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints or None, checkpoint_score_attribute=keep_best_by,
                checkpoint_score_order="min"),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        try:
            last = f"its last complete checkpoint is {ckpt.find(run_dir)}"
        except ckpt.CheckpointError:
            last = "it wrote no complete checkpoint"
        except storage.StorageError as se:  # the storage itself may be what failed: say so, keep the advice
            last = f"its checkpoints cannot be listed now ({se})"
        cause = " ".join(str(e).split())[:400]
        raise TrainingFailed(f"run {cfg.run.name!r} failed and max_failures={t.max_failures} restarts were used up; "
                             f"{last}; run the same --name again to resume. Cause: {cause}") from None
