"""The driver of a Ray Train run: checks, inputs in the object store, the TorchTrainer, and one clear line when
a run runs out of restarts.

    out = fit(cfg)            # {"checkpoint": ..., "step": ..., "fid_domain": ...}
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from .. import checkpoint as ckpt
from .. import data as data_mod
from .. import metrics as metrics_mod
from .. import privacy, storage, warmstart
from ..config import Config, ConfigError, RunError, replace, validate
from ..plan import alive_nodes, check_cluster, layout, plan_workers, resolve
from .progress import progress_callback, relayed_lines
from .worker import worker_loop


class _Trainer(TorchTrainer):
    """Ray's TorchTrainer less its Ray Data callback. Workers get their images through the object store, never
    a Ray Dataset, yet Ray 2.60 starts a DatasetManager actor (a fresh process, ~2 CPU-s here) per worker
    group for it. Its other work, handing workers the driver's DataContext, serves Ray Data alone."""

    def _create_default_callbacks(self):
        return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ != "DatasetsCallback"]


class TrainingFailed(RunError):
    """A run failed more often than train.max_failures allows; the message says where it can resume."""


def check_inputs(cfg: Config) -> None:
    """Before Ray starts: the storage can be written (bucket, credentials, endpoint) and the dataset is there;
    a DP run's delta fits its data, and resuming it keeps its epsilon true."""
    storage.check(cfg.run.storage)
    data_mod.ensure(cfg.data)
    spent = spent_privacy(cfg)
    if cfg.privacy.enabled:  # delta against the training images; sigma or the step cap within what is left
        privacy.resolved(cfg, data_mod.size(cfg.data), spent)
    if cfg.train.init_from and _latest_meta(cfg) is None:  # there, and not this DP run's private images
        warmstart.source(cfg, shapes=False)


def make_inputs(cfg: Config, local: bool = False) -> dict[str, Any]:
    """What every worker needs, made once by the driver: the training images and, with train.eval_every,
    the scoring reference. Put in Ray's object store (unless local), so workers on any node read them
    from there, one copy per node, and no worker looks for a dataset or a cache on its own disk."""
    inputs: dict[str, Any] = {"data": data_mod.load(cfg.data, "train").to_numpy()}
    if cfg.train.eval_every:
        inputs["eval"] = metrics_mod.training_reference(cfg)
    return inputs if local else {k: ray.put(v) for k, v in inputs.items()}


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


def prepare(cfg: Config, concurrent: int = 1) -> Config:
    """Validate and resolve 'auto' values (channels, classes, GPU, AMP, workers and threads, name)
    against the data and the cluster; `concurrent` runs will share the cluster (a search)."""
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
    return storage.join(storage.root(cfg), cfg.run.name)


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
    before = _latest_meta(cfg)  # a resumed run keeps the weights it started from; a fresh one may take some
    init = before.get("init_from") if before else warmstart.source(cfg)
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
        if cfg.privacy.enabled:
            print(privacy.describe(cfg, data_mod.size(cfg.data), privacy.resume_history(cfg, before), init),
                  flush=True)
    with relayed_lines(enabled=not (quiet or local)) as lines:
        cbs = list(callbacks or [])
        if not local:
            cbs.append(progress_callback(run_dir, t.steps, lines, layout=layout(cfg), init=init))
        result = _run_trainer(cfg, run_dir, cbs, verbose, keep_best_by, driver_cpus,
                              {"cfg": cfg.to_dict(), "local": local, "run_dir": run_dir, "echo": not quiet,
                               "lines": lines, "inputs": inputs, "init": None if before else init})
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


def _run_trainer(cfg: Config, run_dir: str, callbacks: list, verbose: bool, keep_best_by: str | None,
                 driver_cpus: float, loop_config: dict[str, Any]):
    """Ray Train's TorchTrainer for the run, fitted; a run out of restarts ends in one TrainingFailed line."""
    t = cfg.train
    trainer = _Trainer(
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

