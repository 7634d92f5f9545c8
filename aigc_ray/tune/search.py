"""The search driver: a search's settings (Search), checked before Ray starts; trials fitted to the cluster;
the Tuner built (or restored from the search's folder) and run; the report written."""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator

from .. import data as data_mod
from .. import metrics as metrics_mod
from .. import plan, train
from .. import storage as storage_mod
from ..config import Config, ConfigError, check_run_name, replace, validate, with_cache
from ..metrics import METRIC_KEYS
from .pbt import check_scheduler, make_scheduler
from .report import Progress, report
from .space import PBT_SPACE, default_space, parse_space
from .trial import TRIAL_CPUS, run_trial


@dataclass(frozen=True)
class Search:
    """What a search does: `aigc-ray tune`'s flags.

    eval_every: steps between FID reports, ASHA's rungs (0: max_steps / 6); eval_samples: images per FID.
    scheduler: asha (stop laggards), pbt (every perturb_every steps the worst `quantile` of the population
    copies a member of the best quantile and perturbs the PBT_MUTABLE keys; pbt_lineage.csv), none.
    seed: every trial's train.seed, and the sampler's (random or Optuna): the same seed, the same configurations.
    space: config keys to ranges (tune.space); None: the scheduler's default space.
    """
    name: str = "search"
    num_trials: int = 8
    max_steps: int = 3000
    metric: str = "fid-domain"
    space: dict[str, Any] | None = None
    workers_per_trial: int = 1
    gpus_per_trial: float = 0
    max_concurrent: int = 0
    searcher: str = "random"
    eval_every: int = 0
    grace_steps: int = 0
    eval_samples: int = 1000
    seed: int = 0
    scheduler: str = "asha"
    perturb_every: int = 0
    quantile: float = 0.25

    def checked(self) -> "Search":
        """Everything a user can get wrong, checked before Ray starts; the 'auto' intervals made concrete."""
        check_run_name(self.name)
        if self.num_trials <= 0 or self.max_steps <= 0:
            raise ConfigError(f"tune: --num-trials and --max-steps must be > 0, got {self.num_trials} and "
                              f"{self.max_steps}")
        if self.metric not in ("fid", "fid-domain"):
            raise ConfigError(f"tune: --metric must be fid-domain or fid, got {self.metric!r}")
        if self.workers_per_trial < 1 or self.gpus_per_trial < 0 or self.max_concurrent < 0:
            raise ConfigError("tune: --workers-per-trial must be >= 1, --gpus-per-trial and --max-concurrent >= 0")
        if self.searcher not in ("random", "optuna"):
            raise ConfigError(f"tune: --searcher must be random or optuna, got {self.searcher!r}")
        parse_space(self.raw_space)
        eval_every = self.eval_every or max(1, self.max_steps // 6)
        perturb_every = check_scheduler(self.scheduler, self.raw_space, self.num_trials, self.searcher, eval_every,
                                        self.perturb_every, self.quantile)
        return dataclasses.replace(self, eval_every=eval_every, grace_steps=self.grace_steps or eval_every,
                                   perturb_every=perturb_every)

    @property
    def raw_space(self) -> dict[str, Any]:
        return default_space(self.space, self.scheduler)


def search(base: Config, spec: Search, *, verbose: bool = False, log=print) -> dict[str, Any]:
    """Run (or resume) the search spec.name under base.run.storage; writes trials.csv, fid_vs_step.png and
    best.json, and returns best. verbose: Tune's own tables and banners too."""
    spec = spec.checked()
    if spec.space is None and spec.scheduler == "pbt":
        log(f"[aigc_ray] PBT searches the part of the default space a running member can change: "
            f"{', '.join(PBT_SPACE)}")
    base = _trial_base(base, spec)
    base, concurrent = _fit_trials(base, spec)
    log(f"[aigc_ray] {concurrent} trial{'s' * (concurrent > 1)} at a time, each {plan.layout(base)}")
    search_dir = storage_mod.join(base.run.storage, spec.name)  # normalized where it entered (_trial_base)
    progress = Progress(METRIC_KEYS[spec.metric], log)
    tuner = _tuner(base, spec, search_dir, concurrent, progress, log)
    with _tune_output(verbose):
        grid = tuner.fit()
    return report(grid, search_dir, METRIC_KEYS[spec.metric], spec.max_steps, log, spec.scheduler, progress.reports)


def _trial_base(base: Config, spec: Search) -> Config:
    """The config every trial starts from (before its point of the space), checked against the data."""
    t = spec
    base = with_cache(validate(replace(base, {
        "train.steps": t.max_steps, "train.num_workers": t.workers_per_trial, "train.use_gpu": t.gpus_per_trial > 0,
        "train.eval_every": t.eval_every, "train.log_every": t.eval_every, "train.ckpt_every": t.eval_every,
        "train.eval_metric": t.metric, "train.eval_samples": t.eval_samples,
        "train.keep_checkpoints": 0 if t.scheduler == "pbt" else 2, "train.max_failures": 1, "train.seed": t.seed,
        "run.storage": storage_mod.root(base)})))
    if t.metric == "fid-domain" and not data_mod.info(metrics_mod.scoring_data(base))[1]:
        raise ConfigError("tune: fid-domain needs a labeled dataset; use --metric fid")
    train.check_inputs(base)
    return base


def _fit_trials(base: Config, spec: Search) -> tuple[Config, int]:
    """As many trials at a time as the cluster holds (ASHA gains from breadth), then the CPUs split among
    their workers: 4 trials on 2 CPUs run 2 at a time on 1 thread each, 1 trial gets both."""
    resources, workers, gpus = ray.cluster_resources(), spec.workers_per_trial, spec.gpus_per_trial
    if gpus and workers > resources.get("GPU", 0):
        raise ConfigError(f"tune: {workers} GPU workers per trial, the cluster has {resources.get('GPU', 0):g} GPUs")
    cpus = base.train.cpus_per_worker or 1
    fit = max(1, int((resources.get("GPU", 0) if gpus else resources.get("CPU", 0)) // (workers * (1 if gpus else cpus))))
    concurrent = min(spec.num_trials, spec.max_concurrent or fit)
    workers, cpus = plan.plan_workers(workers, base.train.cpus_per_worker, gpus > 0, plan.alive_nodes(), concurrent)
    if workers * cpus > resources.get("CPU", 0):
        raise ConfigError(f"tune: {workers} workers per trial ({cpus} CPUs each) need {workers * cpus} CPUs, "
                          f"the cluster has {resources.get('CPU', 0):g}")
    return replace(base, {"train.cpus_per_worker": cpus}), concurrent


def _tuner(base: Config, spec: Search, search_dir: str, concurrent: int, progress, log) -> tune.Tuner:
    """The search's Tuner: restored from its folder when it ran before (finished trials stay finished), else
    new. The images and the scoring reference are made once here and shared by every trial through the
    object store; the trial's Train workers hold the real CPUs."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, inputs=train.make_inputs(base)),
                                    {"cpu": TRIAL_CPUS})
    where = storage_mod.ray_storage(base.run.storage)
    fs = where.get("storage_filesystem")
    restore_path = search_dir if fs is None else storage_mod.filesystem(search_dir)[1]
    if tune.Tuner.can_restore(restore_path, storage_filesystem=fs):
        log(f"[aigc_ray] resuming search {spec.name} from {search_dir}")
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    if spec.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch  # an optional extra: aigc_ray[optuna]
        except ImportError:
            raise ConfigError("tune: --searcher optuna needs optuna: pip install 'aigc_ray[optuna]'") from None
        search_alg, limit = OptunaSearch(seed=spec.seed), concurrent
    else:  # random: the seed fixes the sampled configurations, as it fixes Optuna's
        search_alg, limit = BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed), None
    metric_key, param_space = METRIC_KEYS[spec.metric], parse_space(spec.raw_space)
    return tune.Tuner(
        trainable,
        param_space={"base": base.to_dict(), "space": param_space, "metric_key": metric_key, "search_dir": search_dir},
        tune_config=tune.TuneConfig(
            metric=metric_key, mode="min", num_samples=spec.num_trials, max_concurrent_trials=limit,
            search_alg=search_alg,
            scheduler=make_scheduler(spec.scheduler, spec.raw_space, param_space, spec.max_steps, spec.grace_steps,
                                     spec.perturb_every, spec.quantile, all_at_once=spec.num_trials <= concurrent)),
        # A trial whose node dies starts again elsewhere, resuming its Train run from storage.
        run_config=tune.RunConfig(name=spec.name, **where, verbose=0, callbacks=[progress],
                                  failure_config=tune.FailureConfig(max_failures=2)),
    )


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
