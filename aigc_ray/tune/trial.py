"""One trial of a search: a Ray Train run named after the trial, whose every report reaches Tune."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray.tune
from ray.train import UserCallback
from ray.util.queue import Queue

from .. import storage as storage_mod
from .. import train
from ..config import Config, replace
from .pbt import SOURCE_FILE, source, start_run

TRIAL_CPUS = 0.01  # the trial's own driver; its Train workers ask for that much less (train.fit driver_cpus)


def _relay(queue):
    """A Ray Train callback (it runs in the Train controller) that passes every report, with the path of its
    checkpoint, to the trial that started the run, which reports it to Tune."""
    class Relay(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if checkpoint:
                m["checkpoint_path"] = checkpoint.path
            queue.put(m)

    return Relay()


def run_trial(config: dict[str, Any], inputs: dict) -> None:
    """One Tune trial: a Ray Train run (possibly many workers) named after the trial.

    inputs: the images and scoring reference the search driver put in the object store once
    (train.make_inputs); a trial runs on any node and never loads data of its own. Every report reaches
    Tune with a small checkpoint naming the Train checkpoint, which PBT hands to the members it lets copy.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    root = storage_mod.root(Config.from_dict(config["base"]))
    run = start_run(trial_id, root, config["search_dir"], config)
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
            (Path(d) / SOURCE_FILE).write_text(source(trial_id, run, m["step"], m["checkpoint_path"], like=root))
            checkpoint = ray.tune.Checkpoint.from_directory(d)
        ray.tune.report({**m, "run": run, "lr_g": cfg.optim.lr_g, "lr_d": cfg.optim.lr_d}, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)  # Tune has its own copy now
    if "error" in done:
        raise done["error"]

