"""Hyperparameter search with Ray Tune, ranked by FID, each trial a data-parallel Ray Train run.

    aigc-ray tune --dataset fashion-mnist --num-trials 8 --max-steps 3000 --metric fid-domain --name fm-search

Search-space keys are config keys ("optim.lr_g"); a YAML file (--search-space) replaces the default:

    optim.lr_g: {loguniform: [5e-5, 1e-3]}
    loss.name: {choice: [bce, hinge]}
    model.ngf: {grid: [32, 64]}         # every value, times --num-trials
    train.batch_size: 64                # fixed

Random search by default (optional Optuna TPE: --searcher optuna); ASHA stops trials whose FID lags at
each rung. The search folder gets trials.csv (every reported metric), fid_vs_step.png, and best.json:
the contract with serving (checkpoint, metric, value, step, config, trial id).
"""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune.schedulers import PopulationBasedTraining

from . import storage as storage_mod
from .config import Config, ConfigError, all_keys, check_run_name, replace, validate, with_cache
from . import metrics as metrics_mod
from .metrics import METRIC_KEYS

PBT_SPACE: dict[str, Any] = {  # --scheduler pbt's default: what a running member may change
    "optim.lr_g": {"loguniform": [5e-5, 1e-3]},
    "optim.lr_d": {"loguniform": [5e-5, 1e-3]},
    "optim.beta1": {"choice": [0.0, 0.5]},
    "train.ema_decay": {"choice": [0.99, 0.999]},
}
DEFAULT_SPACE: dict[str, Any] = {
    "optim.lr_g": {"loguniform": [5e-5, 1e-3]},
    "optim.lr_d": {"loguniform": [5e-5, 1e-3]},
    "optim.beta1": {"choice": [0.0, 0.5]},
    "optim.beta2": {"choice": [0.9, 0.999]},
    "loss.name": {"choice": ["bce", "wgan-gp", "hinge"]},
    "loss.n_critic": {"choice": [1, 2]},
    "model.ngf": {"choice": [32, 64]},
    "model.ndf": {"choice": [32, 64]},
    "model.spectral_norm": {"choice": [False, True]},
    "train.ema_decay": {"choice": [0.99, 0.999]},
    "train.batch_size": {"choice": [32, 64]},
}
KINDS = ("loguniform", "uniform", "choice", "grid", "randint")
SCHEDULERS = ("asha", "pbt", "none")
# What PBT may change in a running member: its optimiser and loss weights, never what fixes the networks.
PBT_MUTABLE = ("optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "loss.n_critic", "loss.gp_weight",
               "loss.r1_weight", "train.ema_decay")
TRIAL_CPUS = 0.01  # the trial's own driver; its Train workers ask for that much less (train.fit driver_cpus)


def parse_space(space: dict[str, Any]) -> dict[str, Any]:
    """Validate a search space and turn it into Ray Tune samplers; one clear error per mistake."""
    from ray import tune

    if not isinstance(space, dict) or not space:
        raise ConfigError("search space: must be a non-empty mapping of config keys to ranges")
    keys, out = all_keys(), {}
    for key, spec in space.items():
        if key not in keys:
            raise ConfigError(f"search space: unknown key {key!r}; keys look like 'optim.lr_g'")
        if key.startswith("run.") or key in ("train.num_workers", "train.steps", "train.use_gpu"):
            raise ConfigError(f"search space: {key} is set by the search itself, not searched")
        if key.startswith("data."):
            raise ConfigError(f"search space: {key}: every trial trains on the same data; set it with a flag")
        if not isinstance(spec, dict):
            validate(replace(Config(), {key: spec}))  # check a fixed value as a flag would be
            out[key] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"search space: {key}: give one of {', '.join(KINDS)}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space: {key}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("choice", "grid"):
            for v in args:
                validate(replace(Config(), {key: v}))
            out[key] = tune.choice(args) if kind == "choice" else tune.grid_search(args)
            continue
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            raise ConfigError(f"search space: {key}: {kind} needs [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search space: {key}: loguniform needs low > 0, got {args!r}")
        out[key] = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*args)
    return out


def load_space(path: str | None) -> dict[str, Any] | None:
    """A YAML search space, or None (no file): search() then takes its scheduler's default space."""
    if not path:
        return None
    import yaml

    try:
        p = Path(path).expanduser()
        found = p.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        found = False
    if not found:
        raise ConfigError(f"search space: file not found: {str(path)[:200]!r}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"search space: cannot parse {p}: {str(e).splitlines()[0]}") from None


SOURCE_FILE = "source.json"  # what a Tune checkpoint of a trial holds: where its Train checkpoint is


def _relay(queue):
    """A Ray Train callback (it runs in the Train controller) that passes every report, with the path of its
    checkpoint, to the trial that started the run, which reports it to Tune."""
    from ray.train import UserCallback

    class Relay(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if checkpoint:
                m["checkpoint_path"] = checkpoint.path
            queue.put(m)

    return Relay()


def _start(trial_id: str, root: str, search_dir: str, config: dict) -> str:
    """The Train run this trial continues: its own, or under PBT a fresh one seeded with the checkpoint of the
    better member it was told to copy (G, D, EMA, both Adam states, step), recorded in the lineage."""
    import ray.tune

    start = ray.tune.get_checkpoint()
    if start is None:
        return f"train-{trial_id}"
    with start.as_directory() as d:
        src = json.loads((Path(d) / SOURCE_FILE).read_text())
    if src["trial"] == trial_id:
        return src["run"]
    run, n = f"train-{trial_id}-s{src['step']}", 1
    while storage_mod.exists(storage_mod.join(root, run)):  # copied at that step before: a run of its own again
        n += 1
        run = f"train-{trial_id}-s{src['step']}-{n}"
    storage_mod.copy_dir(src["checkpoint"], storage_mod.join(root, run, storage_mod.name(src["checkpoint"])),
                         last="meta.json")
    storage_mod.write_text(storage_mod.join(search_dir, "lineage", f"{run}.json"), json.dumps({
        "trial": trial_id, "step": src["step"], "copied": src["trial"], "checkpoint": src["checkpoint"], "run": run,
        **{f"new {k}": v for k, v in config["space"].items()}}))
    return run


def _trial(config: dict[str, Any], inputs: dict) -> None:
    """One Tune trial: a Ray Train run (possibly many workers) named after the trial.

    inputs: the images and scoring reference the search driver put in the object store once
    (train.make_inputs); a trial runs on any node and never loads data of its own. Every report reaches
    Tune with a small checkpoint naming the Train checkpoint, which PBT hands to the members it lets copy.
    """
    import shutil
    import tempfile
    import threading

    import ray.tune
    from ray.util.queue import Queue

    from . import train

    trial_id = ray.tune.get_context().get_trial_id()
    root = storage_mod.normalize(Config.from_dict(config["base"]).run.storage)
    run = _start(trial_id, root, config["search_dir"], config)
    cfg = replace(Config.from_dict(config["base"]), {**config["space"], "run.name": run})
    queue, done = Queue(actor_options={"num_cpus": 0}), {}

    def work():
        try:
            train.fit(cfg, callbacks=[_relay(queue)], quiet=True, keep_best_by=config["metric_key"],
                      driver_cpus=TRIAL_CPUS, inputs=inputs)
        except BaseException as e:  # raised again in the trial's own thread, below
            done["error"] = e
        finally:
            queue.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (m := queue.get()) is not None:
        checkpoint = None
        if m.get("checkpoint_path"):
            d = tempfile.mkdtemp(prefix="aigc_trial_")
            (Path(d) / SOURCE_FILE).write_text(json.dumps({
                "checkpoint": storage_mod.from_fs_path(m["checkpoint_path"], like=root), "run": run,
                "trial": trial_id, "step": m["step"]}))
            checkpoint = ray.tune.Checkpoint.from_directory(d)
        ray.tune.report({**m, "run": run, "lr_g": cfg.optim.lr_g, "lr_d": cfg.optim.lr_d}, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)  # Tune has its own copy now
    if "error" in done:
        raise done["error"]


def search(base: Config, *, name: str, num_trials: int, max_steps: int, metric: str = "fid-domain",
           space: dict[str, Any] | None = None, workers_per_trial: int = 1, gpus_per_trial: float = 0,
           max_concurrent: int = 0, searcher: str = "random", eval_every: int = 0, grace_steps: int = 0,
           eval_samples: int = 1000, seed: int = 0, scheduler: str = "asha", perturb_every: int = 0,
           quantile: float = 0.25, verbose: bool = False, log=print) -> dict[str, Any]:
    """Run (or resume) the search `name` under base.run.storage; writes trials.csv, fid_vs_step.png, best.json;
    returns best.

    eval_every: steps between FID reports, ASHA's rungs (0: max_steps / 6); eval_samples: images per FID.
    scheduler: asha (stop laggards), pbt (every perturb_every steps the worst `quantile` of the population
    copies a member of the best quantile and perturbs the PBT_MUTABLE keys; pbt_lineage.csv), none.
    seed: every trial's train.seed, and the sampler's (random or Optuna): the same seed, the same configurations.
    """
    import ray
    from ray import tune

    from . import data as data_mod
    from . import train

    # Check everything a user can get wrong before any trial starts.
    check_run_name(name)
    if num_trials <= 0 or max_steps <= 0:
        raise ConfigError(f"tune: --num-trials and --max-steps must be > 0, got {num_trials} and {max_steps}")
    if metric not in ("fid", "fid-domain"):
        raise ConfigError(f"tune: --metric must be fid-domain or fid, got {metric!r}")
    if workers_per_trial < 1:
        raise ConfigError(f"tune: --workers-per-trial must be >= 1, got {workers_per_trial}")
    if searcher not in ("random", "optuna"):
        raise ConfigError(f"tune: --searcher must be random or optuna, got {searcher!r}")
    raw_space = default_space(space, scheduler)
    if space is None and scheduler == "pbt":
        log(f"[aigc_ray] PBT searches the part of the default space a running member can change: "
            f"{', '.join(PBT_SPACE)}")
    param_space = parse_space(raw_space)
    eval_every = eval_every or max(1, max_steps // 6)
    grace_steps = grace_steps or eval_every
    perturb_every = _check_scheduler(scheduler, raw_space, num_trials, searcher, eval_every, perturb_every,
                                     quantile)
    base = with_cache(validate(replace(base, {"train.steps": max_steps, "train.num_workers": workers_per_trial,
                                   "train.use_gpu": gpus_per_trial > 0, "train.eval_every": eval_every,
                                   "train.log_every": eval_every, "train.ckpt_every": eval_every,
                                   "train.eval_metric": metric, "train.eval_samples": eval_samples,
                                   "train.keep_checkpoints": 0 if scheduler == "pbt" else 2,
                                   "train.max_failures": 1, "train.seed": seed,
                                   "run.storage": storage_mod.normalize(base.run.storage)})))
    resources = ray.cluster_resources()
    if gpus_per_trial and workers_per_trial > resources.get("GPU", 0):
        raise ConfigError(f"tune: {workers_per_trial} GPU workers per trial, the cluster has "
                          f"{resources.get('GPU', 0):g} GPUs")
    if metric == "fid-domain" and not data_mod.info(metrics_mod.scoring_data(base))[1]:
        raise ConfigError("tune: fid-domain needs a labeled dataset; use --metric fid")
    train.check_inputs(base)
    # As many trials at a time as the cluster holds (ASHA gains from breadth), then the CPUs split
    # among their workers: 4 trials on 2 CPUs run 2 at a time on 1 thread each, 1 trial gets both.
    nodes = train.alive_nodes()
    cpus = base.train.cpus_per_worker or 1
    fit_trials = max(1, int((resources.get("GPU", 0) if gpus_per_trial else resources.get("CPU", 0))
                            // (workers_per_trial * (1 if gpus_per_trial else cpus))))
    concurrent = min(num_trials, max_concurrent or fit_trials)
    workers, cpus = train.plan_workers(workers_per_trial, base.train.cpus_per_worker, gpus_per_trial > 0, nodes,
                                       concurrent)
    per_trial = workers * cpus
    if per_trial > resources.get("CPU", 0):
        raise ConfigError(f"tune: {workers} workers per trial ({cpus} CPUs each) need {per_trial} CPUs, "
                          f"the cluster has {resources.get('CPU', 0):g}")
    base = replace(base, {"train.cpus_per_worker": cpus})
    log(f"[aigc_ray] {concurrent} trial{'s' * (concurrent > 1)} at a time, each {train.layout(base)}")

    root = base.run.storage  # normalized where it entered, above
    search_dir = storage_mod.join(root, name)
    metric_key = METRIC_KEYS[metric]
    # The images and the scoring reference (domain classifier, test statistics), made once here and
    # shared by every trial through the object store.
    inputs = train.make_inputs(base)
    trainable = tune.with_resources(tune.with_parameters(_trial, inputs=inputs),
                                    {"cpu": TRIAL_CPUS})  # the Train workers hold the real CPUs
    where = storage_mod.ray_storage(root)
    fs = where.get("storage_filesystem")
    restore_path = search_dir if fs is None else storage_mod.filesystem(search_dir)[1]
    if tune.Tuner.can_restore(restore_path, storage_filesystem=fs):
        log(f"[aigc_ray] resuming search {name} from {search_dir}")
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        if searcher == "optuna":
            try:
                from ray.tune.search.optuna import OptunaSearch
            except ImportError:
                raise ConfigError("tune: --searcher optuna needs optuna: pip install 'aigc_ray[optuna]'") from None
            search_alg, limit = OptunaSearch(seed=seed), concurrent
        else:  # random: the seed fixes the sampled configurations, as it fixes Optuna's
            from ray.tune.search import BasicVariantGenerator

            search_alg, limit = BasicVariantGenerator(max_concurrent=concurrent, random_state=seed), None
        tuner = tune.Tuner(
            trainable,
            param_space={"base": base.to_dict(), "space": param_space, "metric_key": metric_key,
                         "search_dir": search_dir},
            tune_config=tune.TuneConfig(
                metric=metric_key, mode="min", num_samples=num_trials, max_concurrent_trials=limit,
                search_alg=search_alg,
                scheduler=_scheduler(scheduler, raw_space, param_space, max_steps, grace_steps, perturb_every,
                                     quantile)),
            # A trial whose node dies starts again elsewhere, resuming its Train run from storage.
            run_config=tune.RunConfig(name=name, **where, verbose=0, callbacks=[Progress(metric_key, log)],
                                      failure_config=tune.FailureConfig(max_failures=2)),
        )
    with _tune_output(verbose):
        grid = tuner.fit()
    return _report(grid, search_dir, metric_key, max_steps, log, scheduler)


@contextmanager
def _tune_output(verbose: bool):
    """Tune's own tables and banners (its configuration box, where the results are) with --verbose only: the
    Progress callback says a line per report. Tune's newer reporter prints the box whatever RunConfig.verbose
    says; with RAY_AIR_NEW_OUTPUT=0 (read as a search starts) its older one honours verbose=0. A value the user
    set is theirs."""
    if verbose or "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def default_space(space: dict | None, scheduler: str) -> dict:
    """The space a search explores: the one given, else PBT's (what a running member may change) or the default."""
    return space if space is not None else (PBT_SPACE if scheduler == "pbt" else DEFAULT_SPACE)


def check_search(*, space: dict | None, scheduler: str, num_trials: int, max_steps: int, searcher: str,
                 eval_every: int, perturb_every: int, quantile: float) -> int:
    """Everything about a search that can be checked before Ray starts; returns PBT's perturbation interval."""
    if num_trials <= 0 or max_steps <= 0:
        raise ConfigError(f"tune: --num-trials and --max-steps must be > 0, got {num_trials} and {max_steps}")
    if searcher not in ("random", "optuna"):
        raise ConfigError(f"tune: --searcher must be random or optuna, got {searcher!r}")
    raw = default_space(space, scheduler)
    parse_space(raw)
    return _check_scheduler(scheduler, raw, num_trials, searcher, eval_every or max(1, max_steps // 6),
                            perturb_every, quantile)


def _check_scheduler(scheduler: str, raw_space: dict, num_trials: int, searcher: str, eval_every: int,
                     perturb_every: int, quantile: float) -> int:
    """One line for every way a scheduler's settings can be wrong; returns PBT's perturbation interval."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"tune: --scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if scheduler != "pbt":
        return 0
    if not 0 < quantile <= 0.5:
        raise ConfigError(f"tune: --quantile must be in (0, 0.5] (the share of members that copy, and are "
                          f"copied), got {quantile}")
    if num_trials < 2:
        raise ConfigError(f"tune: PBT needs a population of at least 2 (--num-trials), got {num_trials}")
    if searcher != "random":
        raise ConfigError("tune: PBT samples its first population itself; drop --searcher optuna")
    for key, spec in raw_space.items():
        if isinstance(spec, dict) and key not in PBT_MUTABLE:
            raise ConfigError(f"tune: PBT cannot change {key} in a running member (it fixes the networks or the "
                              f"data); searchable with PBT: {', '.join(PBT_MUTABLE)}; fix {key} with a flag or "
                              "use --scheduler asha")
        if isinstance(spec, dict) and "grid" in spec:
            raise ConfigError(f"tune: {key}: PBT explores by perturbing, not over a grid; use choice")
    perturb_every = perturb_every or eval_every
    if perturb_every <= 0 or perturb_every % eval_every:
        raise ConfigError(f"tune: --perturb-every ({perturb_every}) must be a positive multiple of --eval-every "
                          f"({eval_every}): members are compared at their reports")
    return perturb_every


def _scheduler(scheduler: str, raw_space: dict, param_space: dict, max_steps: int, grace_steps: int,
               perturb_every: int, quantile: float):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if scheduler == "asha":
        return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=grace_steps, reduction_factor=2)
    if scheduler == "none":
        return FIFOScheduler()
    # A choice mutates to a neighbouring value (or a fresh draw) from its list; as a tune.choice Ray's PBT would
    # multiply it by 0.8 or 1.2, off the list (an EMA decay of 0.999 x 1.2).
    sampled = {k: (list(raw_space[k]["choice"]) if "choice" in raw_space[k] else v)
               for k, v in param_space.items() if isinstance(raw_space[k], dict)}

    def within_bounds(config: dict) -> dict:  # a perturbed value (x0.8, x1.2) stays inside its range
        for key, spec in raw_space.items():
            kind, args = next(iter(spec.items())) if isinstance(spec, dict) else (None, None)
            if kind in ("loguniform", "uniform", "randint") and key in config["space"]:
                config["space"][key] = type(config["space"][key])(min(max(config["space"][key], args[0]), args[1]))
        return config

    return _PBT(max_steps, time_attr="step", perturbation_interval=perturb_every,
                hyperparam_mutations={"space": sampled}, quantile_fraction=quantile,
                custom_explore_fn=within_bounds, synch=False)


class _PBT(PopulationBasedTraining):
    """PBT that leaves a member's final report alone. A copy made there would start at the last step with
    nothing left to train (a restart for nothing), and a donor checkpointed there would hand its copiers
    that same final step. Members copy and are copied at their reports before max_steps."""

    def __init__(self, max_steps: int, **kwargs):
        super().__init__(**kwargs)
        self._max_steps = max_steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("step", 0) >= self._max_steps:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def Progress(metric_key: str, log=print):
    """The driver's live view of a search (a ray.tune.Callback): one line per trial report with the best so
    far, PBT's copies, failed trials. Tune pickles its callbacks with the search's state, so the class holds
    no closure and drops `log` when pickled (a restored search prints)."""
    from ray import tune

    class _Progress(tune.Callback):
        def __init__(self, metric_key: str, log):
            self.metric_key, self._log, self.best, self.runs = metric_key, log, None, {}

        def __getstate__(self):
            return {**self.__dict__, "_log": None}

        def _say(self, line: str) -> None:
            (self._log or print)(line)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            tid, step, value = trial.trial_id, result.get("step"), result.get(self.metric_key)
            run = result.get("run")
            if run and self.runs.get(tid) not in (None, run) and run != f"train-{tid}":
                self._say(f"[aigc_ray] trial {tid} copied a better member at step {step}: "
                          f"lr_g={result.get('lr_g'):.3g} lr_d={result.get('lr_d'):.3g} (run {run})")
            self.runs[tid] = run
            if value is None:
                return
            if self.best is None or value < self.best[0]:
                self.best = (value, tid, step)
            self._say(f"[aigc_ray] trial {tid} step {step} {self.metric_key}={value:.2f} "
                      f"{result.get('images_per_s', 0):.0f} img/s | best {self.best[0]:.2f} "
                      f"(trial {self.best[1]}, step {self.best[2]})")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._say(f"[aigc_ray] trial {trial.trial_id} failed; its error is under {trial.path}")

    return _Progress(metric_key, log)


def _report(grid, search_dir: str, metric_key: str, max_steps: int, log, scheduler: str = "asha") -> dict[str, Any]:
    """trials.csv, the FID plot, the table and best.json from a finished (or resumed) search."""
    import pandas as pd

    from .checkpoint import read_meta

    frames, rows = [], []
    for r in grid:
        if r.metrics_dataframe is None or r.metrics_dataframe.empty:
            continue
        trial_id = r.metrics.get("trial_id") or storage_mod.name(r.path)
        df = r.metrics_dataframe.assign(trial_id=trial_id)
        frames.append(df)
        space = r.config.get("space", {})
        scored = df.dropna(subset=[metric_key]) if metric_key in df else df.iloc[0:0]
        best = scored.loc[scored[metric_key].idxmin()] if len(scored) else None
        rows.append({"trial": trial_id, **{_column(k): _short(v) for k, v in space.items()},
                     "steps": int(df["step"].max()), f"best_{metric_key}": None if best is None else float(best[metric_key]),
                     "best_step": None if best is None else int(best["step"]),
                     "checkpoint": None if best is None or not isinstance(best.get("checkpoint_path"), str)
                     else storage_mod.from_fs_path(best["checkpoint_path"], like=search_dir),
                     "_config": r.config, "error": str(r.error).splitlines()[0] if r.error else ""})
    if not frames:
        raise ConfigError(f"tune: no trial reported a result; see the logs under {search_dir}")
    write = storage_mod.write_text
    write(storage_mod.join(search_dir, "trials.csv"), pd.concat(frames, ignore_index=True).to_csv(index=False))
    storage_mod.write_bytes(storage_mod.join(search_dir, "fid_vs_step.png"), _plot(frames, metric_key))
    lineage = _lineage(search_dir)
    if lineage is not None:
        write(storage_mod.join(search_dir, "pbt_lineage.csv"), lineage.to_csv(index=False))
        storage_mod.write_bytes(storage_mod.join(search_dir, "lr_schedules.png"), _plot(frames, "lr_g", "lr_d"))
    table = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_") and k != "checkpoint"} for r in rows])
    table = table.sort_values(f"best_{metric_key}", na_position="last")
    log("\n" + table.to_string(index=False))
    ranked = [r for r in rows if r[f"best_{metric_key}"] is not None and r["checkpoint"]]
    if not ranked:
        raise ConfigError(f"tune: no trial reported {metric_key} with a checkpoint; see {search_dir}")
    win = min(ranked, key=lambda r: r[f"best_{metric_key}"])
    best = {"checkpoint": win["checkpoint"], "metric": metric_key, "value": win[f"best_{metric_key}"],
            "step": win["best_step"], "trial_id": win["trial"], "search": search_dir,
            "config": json.loads(storage_mod.read_text(storage_mod.join(win["checkpoint"], "config.json"))),
            "steps_run": int(sum(r["steps"] for r in rows)), "steps_full_grid": len(rows) * max_steps,
            "copies": 0 if lineage is None else len(lineage), "scheduler": scheduler,
            "privacy": _search_privacy(rows, win, metric_key)}
    write(storage_mod.join(search_dir, "best.json"), json.dumps(best, indent=2))
    best["best_json"] = storage_mod.join(search_dir, "best.json")
    best["table"] = table.astype(object).where(table.notna(), None).to_dict("records")
    best["worst_value"] = max(r[f"best_{metric_key}"] for r in ranked)
    best["trials"] = len(rows)
    return best


def _search_privacy(rows: list[dict], win: dict, metric_key: str) -> dict[str, Any] | None:
    """The winner's privacy statement, with what the choice among the DP trials costs (all trials composed)."""
    from . import privacy
    from .checkpoint import CheckpointError, find, read_meta

    own = read_meta(win["checkpoint"]).get("privacy")
    if not own:
        return None
    histories = {}
    for r in rows:  # each trial's whole spend: the history of its run's latest checkpoint
        try:
            latest = read_meta(find(storage_mod.parent(r["checkpoint"]))) if r["checkpoint"] else None
        except CheckpointError:
            latest = None
        if latest and latest.get("privacy"):
            histories[r["trial"]] = privacy.history_of(latest["privacy"])
    cfg = win["_config"].get("base", {})
    on = cfg.get("train", {}).get("eval_dataset") or cfg.get("data", {}).get("dataset")
    return {**own, "search": privacy.search_privacy(histories, win["trial"], own["delta"],
                                                    f"{metric_key} on {on}'s test split")}


def _lineage(search_dir: str):
    """Every copy PBT made (who copied whom, at which step, with which new values), or None if none."""
    import pandas as pd

    rows = [json.loads(storage_mod.read_text(e.uri)) for e in storage_mod.list_dir(storage_mod.join(search_dir, "lineage"))
            if e.name.endswith(".json")]
    return pd.DataFrame(rows).sort_values(["step", "trial"]) if rows else None


def _column(key: str) -> str:
    return "loss" if key == "loss.name" else key.split(".")[1]


def _short(v: Any) -> Any:
    return float(f"{v:.3g}") if isinstance(v, float) else v


def _plot(frames, metric_key: str, second: str | None = None) -> bytes:
    """A metric (and a second one, dashed) against step for every trial, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for df in frames:
        for key, style in ((metric_key, "-"), (second, "--")):
            if key and key in df:
                d = df.dropna(subset=[key])
                ax.plot(d["step"], d[key], style, marker="o", markersize=3,
                        label=f"{str(df['trial_id'].iloc[0])[-5:]} {key if second else ''}".strip())
    ax.set_xlabel("step")
    ax.set_ylabel(metric_key + (f" (solid), {second} (dashed)" if second else ""))
    if all(df[metric_key].dropna().gt(0).all() for df in frames if metric_key in df):
        ax.set_yscale("log")
    ax.set_title(f"the learning rates PBT found, every member" if second else
                 f"{metric_key} against step, every trial")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def budget_line(best: dict[str, Any]) -> str:
    if best.get("scheduler") == "pbt":
        return (f"PBT: {best['trials']} members, {best['copies']} copies of a better member, "
                f"{best['steps_run']} steps in all")
    saved = 1 - best["steps_run"] / best["steps_full_grid"]
    return (f"ASHA ran {best['steps_run']} of {best['steps_full_grid']} steps a full run of every trial would "
            f"({saved:.0%} saved)")

