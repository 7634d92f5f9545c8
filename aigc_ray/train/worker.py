"""The loop every Ray Train worker runs: plain PyTorch (aigc_ray.gan.step) plus the marked Ray Train steps."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from .. import data as data_mod
from .. import metrics as metrics_mod
from .. import privacy, storage, warmstart
from ..config import Config, validate
from ..gan.step import TrainState, build_state, load_state_dict, sample_grid, state_dict, train_step, unwrap
from ..plan import layout
from ..seeds import derive
from .progress import Logger, say

# Ray Train's controller takes one report per worker per health-check poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:
# 2 s by default, 0.5 s on a cluster aigc_ray starts) and a worker reporting faster waits for it: on a GPU,
# where 50 steps take a fraction of a second, reporting every log_every steps ran at a tenth of the plain
# loop's speed. Workers report at most this often instead
# (checkpoints and evaluations always), deciding together from their mean clock.
REPORT_EVERY_S = 2.5


def worker_loop(config: dict[str, Any]) -> None:
    cfg = validate(Config.from_dict(config["cfg"]))
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
    if not cfg.privacy.enabled:  # DP samples from the whole set (Poisson), each worker taking its share
        data = data.shard(rank, world)

    # [3] DDP-wrap G and D. No buffer sync in forward: D is called on real and fake images before one
    #     backward, and a buffer broadcast between those calls breaks autograd (BatchNorm stats).
    def wrap(m):
        return ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"forward_sync_buffers": False})

    state = build_state(cfg, device, wrap=wrap if not config["local"] else (lambda m: m), size=size)
    batches = _resume(state, cfg, config, data, rank, world, device)
    _train(state, batches, cfg, config, inputs.get("eval"), rank, world, device)


def _resume(state: TrainState, cfg: Config, config: dict[str, Any], data, rank: int, world: int, device):
    """[4] Resume from the latest checkpoint of this run (a re-run of the same name, or a restart); returns the
    batches that go on from its step."""
    t, resume = cfg.train, _latest(config["run_dir"], config["local"])
    if resume is not None:
        load_state_dict(state, ckpt.load(resume, map_location=device), restore_rng=rank == 0)
        if rank == 0 and config["lines"] is not None:  # to the driver's relay: a restart says where it went on
            config["lines"].put(f"[aigc_ray] worker group of {cfg.run.name} continues at step {state.step} "
                                f"({resume})")
        if rank != 0:  # rank 0 took its RNG state from the checkpoint
            torch.manual_seed(derive(t.seed, "worker", rank, state.step))
    else:
        if config.get("init"):  # a fresh run that fine-tunes another run's weights
            warmstart.apply(state, config["init"], device)
        torch.manual_seed(derive(t.seed, "worker", rank, 0))
    if state.private is not None:
        # DP's sampling: a secret seed from OS entropy, shared by the workers, never from train.seed.
        return privacy.PoissonBatches(data, state.private.q, seed=privacy.secret_seed(device), rank=rank,
                                      world=world, start=state.step * cfg.loss.n_critic, device=device)
    return data_mod.Batches(data, t.batch_size, seed=t.seed, rank=rank, start=state.step * cfg.loss.n_critic,
                            device=device)


def _train(state: TrainState, batches, cfg: Config, config: dict[str, Any], ref: dict | None, rank: int,
           world: int, device) -> None:
    """Steps until train.steps, reporting (and checkpointing, evaluating) as due."""
    t, local, run_dir = cfg.train, config["local"], config["run_dir"]
    logger = Logger(run_dir, t.steps, say if config["echo"] else None, layout(cfg), state.init_from) if local else None
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
        now = time.perf_counter()
        means, mean_elapsed = _mean_window(window, n_window, now - t0, world)
        if not (local or is_ckpt or is_eval or mean_elapsed >= REPORT_EVERY_S):
            continue  # the window grows until the next log point that is due
        metrics = dict(means)
        metrics.update(step=s, images_seen=s * cfg.loss.n_critic * t.batch_size * world,
                       # over the workers' mean window, the clock the choice to report was made on
                       images_per_s=n_window * cfg.loss.n_critic * t.batch_size * world / mean_elapsed,
                       epoch=batches.i // batches.per_epoch)
        if state.private is not None:
            metrics.update(epsilon=state.private.epsilon(), delta=state.private.delta)
        checkpoint, marker = None, None
        if is_eval:  # every worker generates its share; the statistics are all-reduced
            metrics.update(_evaluate(state, cfg, ref, rank, world, device))
        name = f"checkpoint_{s:08d}"
        if is_ckpt and rank == 0:
            checkpoint, marker = _save(state, cfg, metrics, storage.join(run_dir, name), local)
        if logger:
            logger.log(metrics)
        # [5] Report metrics (a barrier: every worker calls it) and rank 0's checkpoint.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        if marker is not None:
            shutil.rmtree(marker, ignore_errors=True)
        window, n_window, t0 = {}, 0, now


def _mean_window(window: dict[str, torch.Tensor], n: int, elapsed: float, world: int) -> tuple[dict, float]:
    """The window's stats averaged over its n steps and the workers, and the seconds since the last report
    averaged over the workers (one small all-reduce): every worker then makes the same choice to report or not.
    Windows tile the run: each one holds the previous report's own cost."""
    keys = sorted(window)
    vec = torch.cat([torch.stack([window[k] for k in keys]).float() / n,
                     torch.tensor([elapsed], device=window[keys[0]].device)])
    if world > 1 and dist.is_initialized():
        dist.all_reduce(vec)
        vec /= world
    *means, mean_elapsed = vec.tolist()
    return {k: float(v) for k, v in zip(keys, means)}, mean_elapsed


def _save(state: TrainState, cfg: Config, metrics: dict, where: str, local: bool):
    """Rank 0's checkpoint: (Ray's Checkpoint of its marker, the marker's folder), or (None, None) in local mode,
    where no Ray storage runs and the folder and its pruning are ours. Otherwise the files go straight to storage
    and Ray copies the marker (meta.json) last and registers the folder."""
    files = ckpt.encode(state=state_dict(state), cfg=cfg, grid_png=sample_grid(state, cfg), metrics=metrics)
    if local:
        ckpt.write(where, files)
        _prune(storage.parent(where), cfg.train.keep_checkpoints)
        return None, None
    marker = Path(tempfile.mkdtemp(prefix="aigc_ckpt_"))
    (marker / ckpt.META_FILE).write_bytes(files.pop(ckpt.META_FILE))
    ckpt.write(where, files)
    return ray.train.Checkpoint.from_directory(str(marker)), marker


def _evaluate(state: TrainState, cfg: Config, ref: dict, rank: int, world: int, device) -> dict[str, float]:
    """The configured metric on G_ema, each worker generating its share of the samples."""
    g = state.g_ema if state.g_ema is not None else unwrap(state.g)
    return metrics_mod.evaluate_in_training(g, cfg, ref, rank=rank, world=world, device=device)


def _latest(run_dir: str, local: bool) -> str | None:
    """The checkpoint to resume from: the newest complete one in the run's folder, or Ray's latest if newer.

    A node can die after a checkpoint is whole in storage but before Ray registered its report: that
    checkpoint still counts, so a restart loses no more than ckpt_every steps."""
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

