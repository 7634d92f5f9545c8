"""The schedulers of a search: ASHA, none, and Population Based Training with its copies of better members
(a member's Train run seeded with the donor's checkpoint) and their lineage."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import ray.tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

from .. import storage as storage_mod
from ..config import ConfigError
from .space import PBT_MUTABLE, SCHEDULERS

SOURCE_FILE = "source.json"  # what a Tune checkpoint of a trial holds: where its Train checkpoint is


def check_scheduler(scheduler: str, raw_space: dict, num_trials: int, searcher: str, eval_every: int,
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


def make_scheduler(scheduler: str, raw_space: dict, param_space: dict, max_steps: int, grace_steps: int,
               perturb_every: int, quantile: float, all_at_once: bool = True):
    """all_at_once: the whole population runs at the same time (num_trials <= trials at a time); a member then
    pauses only for one a full interval behind it (see _PBT)."""
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

    return _PBT(max_steps, all_at_once, time_attr="step", perturbation_interval=perturb_every,
                hyperparam_mutations={"space": sampled}, quantile_fraction=quantile,
                custom_explore_fn=within_bounds, synch=False)


class _PBT(PopulationBasedTraining):
    """Ray's asynchronous PBT, made to work in small populations too, whatever order members report in.

    Ray ranks a member once per perturbation interval, at its own report, against the others' last scores.
    - A member's final report is left alone. A copy made there would start at the last step with nothing
      left to train (a restart for nothing), and a donor checkpointed there would hand its copiers that same
      final step.
    - A member that reaches a point before any other has a score is ranked against no one: Ray would spend
      its interval on that. It is ranked again at its next report.
    - A member that copies is ranked next one interval later; Ray gives it its donor's schedule, which may
      rank it again at once.
    - Every ranked report is a donor, named in a small file under the search's folder written here (Ray asks
      the member's actor to save, and only for the upper quantile; a pause, a finish or a lost node cancels
      that save, and a worse member that ranks below it later skips its copy: in a population of 2, the
      only copy). A member that finished stays a donor: Ray drops it from the ranking, so a member that
      started late was ranked against no one.
    - When the whole population runs at once, a member pauses at a point only for a member that is a full
      interval or more behind it (one that has not started, or whose Train run waits for CPUs), so that the
      two are compared; Ray pauses it whenever another is paused or pending, even for the moment a copy
      restarts (a restart of its own for nothing). A population larger than the trials at a time takes
      turns as Ray has it: a member pauses at a point while another waits.
    """
    _all_at_once = True  # a search pickled by an aigc_ray before this attribute resumes with it

    def __init__(self, max_steps: int, all_at_once: bool = True, **kwargs):
        super().__init__(**kwargs)
        self._max_steps, self._all_at_once = max_steps, all_at_once

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("step", 0) >= self._max_steps:
            return self.CONTINUE
        state = self._trial_state[trial]
        last, copies = state.last_perturbation_time, self._num_perturbations
        decision = super().on_trial_result(tune_controller, trial, result)
        if self._num_perturbations > copies:
            state.last_perturbation_time = result[self._time_attr]
        elif not any(s.last_score is not None for t, s in self._trial_state.items() if t is not trial):
            state.last_perturbation_time = last  # ranked against no one
        ranked = state.last_train_time == result[self._time_attr]
        if ranked and self._all_at_once and decision in (self.CONTINUE, self.PAUSE):
            behind = result[self._time_attr] - self._perturbation_interval
            decision = self.PAUSE if any(
                t is not trial and not t.is_finished() and t.status != t.PAUSED
                and t.last_result.get(self._time_attr, 0) <= behind for t in tune_controller.get_trials()
            ) else self.CONTINUE
        return decision

    def _quantiles(self):
        ranked = sorted((t for t, s in self._trial_state.items() if s.last_score is not None
                         and not math.isnan(s.last_score)), key=lambda t: self._trial_state[t].last_score)
        n = min(math.ceil(len(ranked) * self._quantile_fraction), len(ranked) // 2)
        return (ranked[:n], ranked[len(ranked) - n:]) if n else ([], [])

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        state = self._trial_state[trial]
        state.last_checkpoint = _donor(trial, state.last_result)
        self._num_checkpoints += state.last_checkpoint is not None
        donors = [t for t in upper_quantile if self._trial_state[t].last_checkpoint is not None]
        if trial in lower_quantile and donors:
            self._exploit(tune_controller, trial, random.choice(donors))


def _donor(trial, result: dict):
    """The Tune checkpoint a member that copies this report restarts from: a SOURCE_FILE under the search's
    folder, naming the report's Train checkpoint. None for a report without one."""
    if not result.get("checkpoint_path"):
        return None
    search_dir = trial.config["search_dir"]
    uri = storage_mod.join(search_dir, "donors", f"{trial.trial_id}-s{result['step']}")
    storage_mod.write_text(storage_mod.join(uri, SOURCE_FILE), source(
        trial.trial_id, result["run"], result["step"], result["checkpoint_path"], like=search_dir))
    fs, path = storage_mod.filesystem(uri)
    return ray.tune.Checkpoint(path, filesystem=fs)


def source(trial_id: str, run: str, step: int, checkpoint_path: str, like: str) -> str:
    """A SOURCE_FILE: where a member's Train checkpoint at a report is (checkpoint_path as Ray reports it,
    inside `like`'s filesystem), and whose."""
    return json.dumps({"checkpoint": storage_mod.from_fs_path(checkpoint_path, like=like), "run": run,
                       "trial": trial_id, "step": step})


def start_run(trial_id: str, root: str, search_dir: str, config: dict) -> str:
    """The Train run this trial continues: its own, or under PBT a fresh one seeded with the checkpoint of the
    better member it was told to copy (G, D, EMA, both Adam states, step), recorded in the lineage."""
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


def lineage(search_dir: str):
    """Every copy PBT made (who copied whom, at which step, with which new values), or None if none."""
    rows = [json.loads(storage_mod.read_text(e.uri)) for e in storage_mod.list_dir(storage_mod.join(search_dir, "lineage"))
            if e.name.endswith(".json")]
    return pd.DataFrame(rows).sort_values(["step", "trial"]) if rows else None

