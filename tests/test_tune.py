"""A real Ray Tune search over Ray Train trials on mnist-5k, with tiny budgets."""

import json
from pathlib import Path

import pandas as pd
import pytest

from aigc_ray import tune
from aigc_ray.checkpoint import load_generator
from aigc_ray.config import ConfigError


@pytest.mark.parametrize("space,needle", [
    ({"optim.lr": {"loguniform": [1e-4, 1e-3]}}, "unknown key 'optim.lr'"),
    ({"loss.name": {"choice": []}}, "needs a non-empty list"),
    ({"optim.lr_g": {"loguniform": [1e-3, 1e-4]}}, "low < high"),
    ({"optim.lr_g": {"normal": [0, 1]}}, "give one of"),
    ({"loss.name": {"choice": ["bce", "wgan"]}}, "loss.name: must be one of"),
    ({"train.steps": 5}, "set by the search itself"),
])
def test_bad_search_spaces_fail_with_one_line(space, needle):
    with pytest.raises(ConfigError) as e:
        tune.parse_space(space)
    assert needle in str(e.value)


def test_bad_budgets_fail_before_any_trial(ray_cluster, tiny, tmp_path):
    with pytest.raises(ConfigError, match="must be > 0"):
        tune.search(tiny(), name="s", storage=str(tmp_path), num_trials=0, max_steps=10)
    with pytest.raises(ConfigError, match=r"3 workers per trial \(1 CPUs each\) need 3 CPUs, the cluster has 2"):
        tune.search(tiny(), name="s", storage=str(tmp_path), num_trials=1, max_steps=10, workers_per_trial=3)
    assert not (tmp_path / "s").exists()


def test_search_ranks_by_fid_stops_the_absurd_trial_and_resumes(ray_cluster, tiny, tmp_path):
    space = {"optim.lr_g": {"grid": [2e-3, 1e-3, 50.0]}, "optim.lr_d": 2e-3}
    kwargs = dict(name="s", storage=str(tmp_path), num_trials=1, max_steps=40, metric="fid-domain", space=space,
                  max_concurrent=1, eval_every=10, eval_samples=200)
    best = tune.search(tiny(model__ngf=16, model__ndf=16), **kwargs)
    search = tmp_path / "s"
    trials = pd.read_csv(search / "trials.csv")
    per_trial = trials.groupby("trial_id").agg(steps=("step", "max"), best=("fid_domain", "min"))
    assert len(per_trial) == 3 and (search / "fid_vs_step.png").stat().st_size > 1000

    # best.json names the trial with the lowest reported metric, and its checkpoint samples.
    saved = json.loads((search / "best.json").read_text())
    assert saved["trial_id"] == per_trial["best"].idxmin()
    assert saved["value"] == pytest.approx(per_trial["best"].min())
    assert saved["metric"] == "fid_domain" and saved["config"]["optim"]["lr_g"] != 50.0
    g, cfg, meta = load_generator(saved["checkpoint"])
    assert meta["step"] == saved["step"]
    import torch

    assert g(torch.randn(2, cfg.model.latent_dim)).shape == (2, 1, 32, 32)

    # ASHA stopped the absurd learning rate early: it ran fewer steps than the budget.
    lr_of = {t: json.loads(Path(p).read_text())["optim"]["lr_g"] for t, p in
             trials.dropna(subset=["checkpoint_path"]).groupby("trial_id")["checkpoint_path"].last()
             .map(lambda c: str(Path(c) / "config.json")).items()}
    absurd = [t for t, lr in lr_of.items() if lr == 50.0][0]
    assert per_trial.loc[absurd, "steps"] < 40
    assert best["steps_run"] < best["steps_full_grid"] == 3 * 40

    # The same name again resumes the finished search instead of starting over.
    logs = []
    again = tune.search(tiny(model__ngf=16, model__ndf=16), **kwargs, log=logs.append)
    assert any("resuming search s" in line for line in logs)
    assert again["trial_id"] == best["trial_id"] and again["steps_run"] == best["steps_run"]
