"""A real Ray Tune search over Ray Train trials on mnist-5k, with tiny budgets."""

import json
import subprocess
import sys
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
        tune.search(tiny(run__storage=str(tmp_path)), tune.Search(name="s", num_trials=0, max_steps=10))
    with pytest.raises(ConfigError, match=r"3 workers per trial \(1 CPUs each\) need 3 CPUs, the cluster has 2"):
        tune.search(tiny(run__storage=str(tmp_path)), tune.Search(name="s", num_trials=1, max_steps=10,
                                                                 workers_per_trial=3))
    assert not (tmp_path / "s").exists()


def _tune_cli(args: list[str]) -> tuple[list[str], bool]:
    """`aigc-ray tune ARGS` in a subprocess: its output lines, and whether it was still running when its first
    trial report came (the lines come as the search goes, not at its end)."""
    proc = subprocess.Popen([sys.executable, "-m", "aigc_ray.cli", "tune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, running_when_seen = [], None
    for line in proc.stdout:
        seen.append(line)
        if running_when_seen is None and line.startswith("[aigc_ray] trial ") and " step " in line:
            running_when_seen = proc.poll() is None
    assert proc.wait(timeout=600) == 0, "".join(seen[-30:])
    return seen, bool(running_when_seen)


def _json_line(lines: list[str]) -> dict:
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


def test_a_search_ranks_by_fid_says_so_as_it_goes_stops_the_absurd_trial_and_resumes(ray_cluster, tmp_path, capsys):
    """`aigc-ray tune` as a user runs it, on the session's cluster (--address). Two trials, one run after the
    other: each trial's start (its driver, Train controller and worker, each a fresh process) costs ~15 s here."""
    (tmp_path / "space.yaml").write_text("optim.lr_g: {grid: [2.0e-3, 50.0]}\noptim.lr_d: 2.0e-3\n")
    args = ["--address", ray_cluster.get_runtime_context().gcs_address, "--dataset", "mnist-5k", "--ngf", "16",
            "--ndf", "16", "--latent-dim", "16", "--batch-size", "16", "--num-trials", "1", "--max-steps", "40",
            "--metric", "fid-domain", "--search-space", str(tmp_path / "space.yaml"), "--max-concurrent", "1",
            "--eval-every", "10", "--eval-samples", "200", "--name", "s", "--storage", str(tmp_path), "--json"]
    seen, running_when_seen = _tune_cli(args)
    assert running_when_seen, "".join(seen)  # read before the search ended
    reports = [s for s in seen if s.startswith("[aigc_ray] trial ") and "fid_domain=" in s and "| best " in s]
    assert len(reports) >= 3
    assert not any("Moving model to device" in s or "Started training worker group" in s for s in seen)
    assert not any("Configuration for experiment" in s or "View detailed results" in s for s in seen)  # Tune's
    best = _json_line(seen)
    search = tmp_path / "s"
    trials = pd.read_csv(search / "trials.csv")
    per_trial = trials.groupby("trial_id").agg(steps=("step", "max"), best=("fid_domain", "min"))
    assert len(per_trial) == 2 and (search / "fid_vs_step.png").stat().st_size > 1000

    # best.json names the trial with the lowest reported metric, and its checkpoint samples.
    saved = json.loads((search / "best.json").read_text())
    assert saved["trial_id"] == per_trial["best"].idxmin() == best["trial_id"]
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
    assert best["steps_run"] < best["steps_full_grid"] == 2 * 40

    # The same name again resumes the finished search instead of starting over (in this process: the command's
    # own process was the first run's).
    from aigc_ray.cli import main

    capsys.readouterr()
    assert main(["tune", *args]) == 0
    seen = capsys.readouterr().out.splitlines()
    assert any("resuming search s" in line for line in seen)
    again = _json_line(seen)
    assert again["trial_id"] == best["trial_id"] and again["steps_run"] == best["steps_run"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"space": {"model.ngf": {"choice": [16, 32]}}}, "PBT cannot change model.ngf in a running member"),
    ({"space": {"loss.name": {"choice": ["bce", "hinge"]}}}, "PBT cannot change loss.name"),
    ({"quantile": 0.7}, "--quantile must be in (0, 0.5]"),
    ({"quantile": 0.0}, "--quantile must be in (0, 0.5]"),
    ({"num_trials": 1}, "population of at least 2"),
    ({"perturb_every": 15}, "must be a positive multiple of --eval-every (10)"),
])
def test_a_bad_pbt_search_is_one_line_before_any_trial(ray_cluster, tiny, tmp_path, kwargs, needle):
    args = {"name": "p", "num_trials": 4, "max_steps": 40, "eval_every": 10,
            "scheduler": "pbt", **kwargs}
    with pytest.raises(ConfigError) as e:
        tune.search(tiny(run__storage=str(tmp_path)), tune.Search(**args))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p").exists()


def test_a_bad_pbt_space_from_the_command_line_is_exit_2_before_ray(tmp_path, capsys):
    import ray

    from aigc_ray.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("model.ndf: {choice: [16, 32]}\noptim.lr_g: {loguniform: [1.0e-4, 1.0e-3]}\n")
    started = ray.is_initialized()
    code = main(["tune", "--dataset", "mnist-5k", "--scheduler", "pbt", "--search-space", str(space),
                 "--storage", str(tmp_path / "runs")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "PBT cannot change model.ndf" in lines[0]
    assert ray.is_initialized() == started and not (tmp_path / "runs").exists()


def test_readmes_pbt_example_searches_what_pbt_can_change():
    """`aigc-ray tune --scheduler pbt` with no --search-space: the default space holds loss.name, which PBT
    cannot change in a running member; the search takes PBT's part of it instead of refusing."""
    assert tune.load_space(None) is None
    assert tune.default_space(None, "pbt") == tune.PBT_SPACE and set(tune.PBT_SPACE) <= set(tune.PBT_MUTABLE)
    assert tune.Search(scheduler="pbt", num_trials=4, max_steps=3000).checked().perturb_every == 500
    with pytest.raises(ConfigError, match="PBT cannot change loss.name"):
        tune.Search(space=tune.DEFAULT_SPACE, scheduler="pbt", num_trials=4, max_steps=3000).checked()


def test_pbt_leaves_a_members_final_report_alone():
    # A copy made at max_steps would restart the member with nothing left to train; PBT's own state (which
    # would hold this trial once it is added) is never consulted for it.
    raw = {"optim.lr_g": {"loguniform": [1e-4, 3e-3]}}
    pbt = tune.make_scheduler("pbt", raw, tune.parse_space(raw), max_steps=40, grace_steps=0, perturb_every=10,
                          quantile=0.5)
    assert pbt.on_trial_result(None, object(), {"step": 40}) == "CONTINUE"
    assert pbt.on_trial_result(None, object(), {"step": 41}) == "CONTINUE"


def test_pbt_perturbs_a_choice_to_a_value_of_its_list_and_a_range_within_it():
    from ray.tune.schedulers.pbt import _explore

    pbt = tune.make_scheduler("pbt", tune.PBT_SPACE, tune.parse_space(tune.PBT_SPACE), max_steps=40, grace_steps=0,
                          perturb_every=10, quantile=0.25)
    config = {"space": {"optim.lr_g": 1e-3, "optim.lr_d": 5e-5, "optim.beta1": 0.5, "train.ema_decay": 0.999}}
    seen = set()
    for _ in range(200):
        new, _ = _explore(config, pbt._hyperparam_mutations, pbt._resample_probability, pbt._perturbation_factors,
                          pbt._custom_explore_fn)
        space = new["space"]
        assert space["train.ema_decay"] in (0.99, 0.999) and space["optim.beta1"] in (0.0, 0.5)
        assert 5e-5 <= space["optim.lr_d"] <= 1e-3 and 5e-5 <= space["optim.lr_g"] <= 1e-3
        seen.add(space["train.ema_decay"])
    assert seen == {0.99, 0.999}


@pytest.mark.slow
def test_pbt_members_copy_a_better_one_perturb_and_resume(ray_cluster, tiny, tmp_path):
    import torch

    from aigc_ray import checkpoint as ckpt

    # Seed 1 draws one member whose G barely moves (lr_g 1e-7; fid_domain stays ~550) and one that learns; both
    # run at once. Up to step 60 the two are within the noise of 200 samples (520-545 against 550-565,
    # 2026-12-02); by 90 the learner is far ahead (~300), so members are ranked from 90. A member ranks at its
    # own report against the others' last scores: the laggard copies the learner at 90 if it reports there
    # second; if first, it is ranked against no one, and again at each report until the learner has a score.
    # A member a full interval ahead pauses for the other (one whose Train run waits for the CPUs: with a
    # 0.5-CPU actor holding part of the cluster the laggard still copied, 2026-12-02), and a learner that
    # finished first stays a donor.
    space = {"optim.lr_g": {"choice": [1e-7, 2e-3]}, "optim.lr_d": {"loguniform": [1e-4, 3e-3]}}
    kwargs = dict(name="p", num_trials=2, max_steps=180, metric="fid-domain", space=space, max_concurrent=2,
                  eval_every=30, eval_samples=200, scheduler="pbt", perturb_every=90, quantile=0.5, seed=1)
    logs = []
    best = tune.search(tiny(model__ngf=16, model__ndf=16, run__storage=str(tmp_path)), tune.Search(**kwargs),
                       log=logs.append)
    search = tmp_path / "p"
    reports = pd.read_csv(search / "trials.csv").sort_values("step", kind="stable").groupby("trial_id")
    # Every report, a member's from before its copy too (Tune's own record can lose those).
    assert set(reports["step"].min()) == {30}
    assert set(reports["lr_g"].first()) == {1e-7, 2e-3}  # the seed drew both kinds of member
    assert (search / "pbt_lineage.csv").exists(), "no copy:\n" + "\n".join(logs)
    lineage = pd.read_csv(search / "pbt_lineage.csv")
    assert len(lineage) >= 1 and best["copies"] == len(lineage)
    assert (lineage["step"] < 180).all()  # never at a final report, where nothing would be left to train
    row = lineage.iloc[0]
    # The copy starts from the donor's checkpoint (G, D, EMA, both Adam states, step) under a run of its own...
    run = tmp_path / row["run"]
    assert row["run"].startswith(f"train-{row['trial']}-s{row['step']}")
    copied = run / Path(row["checkpoint"]).name
    donor, start = ckpt.load(row["checkpoint"]), ckpt.load(str(copied))
    assert start["step"] == donor["step"] == row["step"]
    for part in ("g", "d", "g_ema"):
        assert all(torch.equal(donor[part][k], start[part][k]) for k in donor[part])
    assert start["opt_g"]["state"][0]["step"] == donor["opt_g"]["state"][0]["step"]
    # ... with perturbed learning rates in its config, and trains on from the donor's step with them.
    donor_cfg = json.loads((Path(row["checkpoint"]) / "config.json").read_text())["optim"]
    new_cfg = json.loads((run / "config.json").read_text())["optim"]
    assert (new_cfg["lr_g"], new_cfg["lr_d"]) != (donor_cfg["lr_g"], donor_cfg["lr_d"])
    assert (new_cfg["lr_g"], new_cfg["lr_d"]) == (row["new optim.lr_g"], row["new optim.lr_d"])
    latest = ckpt.load(ckpt.find(str(run)))
    assert latest["step"] > row["step"] and latest["opt_g"]["param_groups"][0]["lr"] == new_cfg["lr_g"]
    assert any("copied a better member" in line for line in logs)
    assert (search / "lr_schedules.png").stat().st_size > 1000
    saved = json.loads((search / "best.json").read_text())
    assert saved["value"] == best["value"] and ckpt.find(saved["checkpoint"])

    # An interrupted (here: finished) PBT search resumes like the others.
    again_logs = []
    again = tune.search(tiny(model__ngf=16, model__ndf=16, run__storage=str(tmp_path)), tune.Search(**kwargs),
                        log=again_logs.append)
    assert any("resuming search p" in line for line in again_logs)
    assert again["trial_id"] == best["trial_id"] and again["copies"] == best["copies"]
