"""The train step without Ray, local mode, and real 2-worker Ray Train runs with resume."""

import json
from pathlib import Path

import pytest
import torch

from aigc_ray import checkpoint as ckpt
from aigc_ray import data, train
from aigc_ray.plan import resolve
from aigc_ray.gan.step import build_state, train_step
from aigc_ray import plan
from aigc_ray.train.worker import REPORT_EVERY_S


def _resolved(cfg):
    return resolve(cfg, channels=1, num_classes=10)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("loss", ["bce", "wgan-gp", "hinge", "lsgan"])
def test_train_step_runs_without_ray_and_updates_both_nets(tiny, loss, arch):
    cfg = _resolved(tiny(loss__name=loss, model__arch=arch, model__spectral_norm=arch == "resnet"))
    state = build_state(cfg)
    g0 = [p.clone() for p in state.g.parameters()]
    d0 = [p.clone() for p in state.d.parameters()]
    batches = data.Batches(data.load(cfg.data), cfg.train.batch_size, seed=0)
    stats = train_step(state, batches, cfg)
    assert state.step == 1 and batches.i == cfg.loss.n_critic
    assert {"loss_d", "loss_g"} <= set(stats) and all(torch.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, state.g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, state.d.parameters()))
    if loss == "wgan-gp":
        assert stats["gp"] > 0 and "wasserstein" in stats


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conditional_train_step(tiny, arch):
    cfg = _resolved(tiny(model__conditional=True, loss__name="hinge", model__arch=arch))
    state = build_state(cfg)
    train_step(state, data.Batches(data.load(cfg.data), 16, seed=0), cfg)
    assert state.step == 1


def test_ema_tracks_g_with_warmup(tiny):
    cfg = _resolved(tiny())
    state = build_state(cfg)
    batches = data.Batches(data.load(cfg.data), 16, seed=0)
    for _ in range(3):
        train_step(state, batches, cfg)
    g, ema = list(state.g.parameters()), list(state.g_ema.parameters())
    assert not any(p.requires_grad for p in ema)
    assert any(not torch.equal(a, b) for a, b in zip(g, ema))  # an average, not a copy
    assert all(torch.allclose(a, b, atol=0.05) for a, b in zip(g, ema))  # but close, early on


@pytest.mark.parametrize("recipe", [{}, {"model__arch": "resnet", "loss__name": "hinge", "loss__r1_weight": 1.0,
                                     "augment__adaptive": True, "augment__p": 0.0, "augment__speed": 500}])
def test_local_mode_resume_is_exact(tiny, recipe):
    """4 steps then resume to 6 gives the same weights as 6 steps straight (RNG, data order, Adam, and the
    augmentation strength, R1's schedule and ADA's pending r_t in the ResNet recipe)."""
    straight = train.fit(tiny(train__steps=6, run__name="straight", **recipe), quiet=True)
    train.fit(tiny(train__steps=4, run__name="split", **recipe), quiet=True)
    resumed = train.fit(tiny(train__steps=6, run__name="split", **recipe), quiet=True)
    assert straight["step"] == resumed["step"] == 6
    a, b = ckpt.load(straight["checkpoint"]), ckpt.load(resumed["checkpoint"])
    for k in a["g"]:
        assert torch.equal(a["g"][k], b["g"][k]), k
    assert b["opt_g"]["state"][0]["step"] == 6
    assert (a["aug_p"], a["d_steps"], a["r_t"]) == (b["aug_p"], b["d_steps"], b["r_t"])


def test_init_from_starts_a_fresh_run_from_another_runs_weights_and_a_resume_keeps_its_own(tiny):
    from aigc_ray.config import ConfigError

    public = train.fit(tiny(run__name="public", train__steps=2), quiet=True)
    still = {"optim__lr_g": 1e-12, "optim__lr_d": 1e-12}  # Adam moves each weight by ~lr: it stays where it began
    tuned = train.fit(tiny(run__name="tuned", train__init_from=public["run_dir"], **still), quiet=True)
    fresh = train.fit(tiny(run__name="fresh", train__seed=1, **still), quiet=True)
    a, b, c = (ckpt.load(o["checkpoint"]) for o in (public, tuned, fresh))
    for part in ("g", "d"):  # the weights (BatchNorm's statistics and spectral norm's u, v move anyway)
        weights = [k for k in a[part] if not ("running_" in k or "num_batches" in k or k.endswith(("._u", "._v")))]
        assert weights and all(torch.allclose(a[part][k], b[part][k], atol=1e-6) for k in weights), part
    assert not torch.allclose(a["g"]["net.0.weight"], c["g"]["net.0.weight"], atol=1e-3)  # a fresh init differs
    assert b["opt_g"]["state"][0]["step"] == 4 and b["step"] == 4  # Adam and the steps start afresh
    meta = ckpt.read_meta(tuned["checkpoint"])
    assert meta["init_from"] == {"checkpoint": public["checkpoint"], "step": 2, "dataset": "mnist-5k", "dp": False}
    # Running the same name again resumes its own checkpoint; the weights it started from stay named.
    again = train.fit(tiny(run__name="tuned", train__steps=6, train__init_from=public["run_dir"], **still), quiet=True)
    assert ckpt.load(again["checkpoint"])["opt_g"]["state"][0]["step"] == 6
    assert ckpt.read_meta(again["checkpoint"])["init_from"] == meta["init_from"]
    with pytest.raises(ConfigError, match=r"^train.init_from: .* has other networks: model.ngf 8 \(this run: 16\)$"):
        train.fit(tiny(run__name="wide", model__ngf=16, train__init_from=public["run_dir"]), quiet=True)
    with pytest.raises(ConfigError, match="train.init_from: .* does not exist"):
        train.fit(tiny(run__name="none", train__init_from=public["run_dir"] + "-not-there"), quiet=True)


def test_resume_refuses_a_different_model(tiny):
    from aigc_ray.config import ConfigError

    train.fit(tiny(run__name="r"), quiet=True)
    with pytest.raises(ConfigError, match="model.ngf"):
        train.fit(tiny(run__name="r", model__ngf=16), quiet=True)


def test_checkpoint_is_self_describing(tiny):
    out = train.fit(tiny(), quiet=True)
    d = Path(out["checkpoint"])
    assert {p.name for p in d.iterdir()} >= {"model.pt", "config.json", "samples.png", "meta.json"}
    state = ckpt.load(d)
    assert set(state) >= {"g", "g_ema", "d", "opt_g", "opt_d", "step", "rng", "config"}
    g, cfg, meta = ckpt.load_generator(d.parent)  # a run folder resolves to its latest checkpoint
    assert meta["step"] == 4 and cfg.model.ngf == 8
    assert g(torch.randn(2, cfg.model.latent_dim)).shape == (2, 1, 32, 32)


def test_two_workers_report_sparingly_checkpoint_evaluate_and_resume_with_optimizer_state(ray_cluster, tiny, capfd):
    """Two Ray Train workers, 300 fast steps, then a resume of the same run.

    Ray Train's controller takes one report per worker per poll and a faster reporter waits for it: reporting
    every log_every steps of fast steps stalled the workers (~10x at Ray's 2 s poll). Reports of 2 workers
    come once per REPORT_EVERY_S of their mean clock (checkpoints and evaluations excepted), and both workers
    make the same choice (a split choice would hang the report barrier)."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(train__num_workers=2, train__steps=300, train__log_every=5, train__ckpt_every=150, run__name="ddp",
               train__eval_every=300, train__eval_samples=64)
    first = train.fit(cfg, quiet=True)
    time.sleep(3)  # the workers' log lines reach this process asynchronously
    assert "Checkpoint successfully created" not in "".join(capfd.readouterr())  # Ray's chatter: --verbose only
    assert first["fid_domain"] > 0  # the workers generated their shares and all-reduced the statistics
    run = Path(first["run_dir"])
    assert first["step"] == 300
    ckpts = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000150", "checkpoint_00000300"]
    grid = run / "checkpoint_00000300" / "samples.png"
    from PIL import Image

    assert Image.open(grid).size == (8 * 34 + 2, 8 * 34 + 2)  # 64 images of 32x32, 8 a row

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("images_per_s")]
    rates = [e.value for e in acc.Scalars("images_per_s")]
    assert steps[-1] == 300 and len(steps) < 300 // 5  # far fewer reports than log points
    assert all(s % 5 == 0 for s in steps)  # each at a log point
    starts = [0] + steps[:-1]
    # images_per_s is over the workers' mean window, the clock they chose to report on (one worker's own
    # window can run short of it while the other's runs long, as when the CPUs are shared).
    window_s = [(s - s0) * 16 * 2 / r for s, s0, r in zip(steps, starts, rates)]
    assert all(w >= REPORT_EVERY_S * 0.99 for w, s in zip(window_s, steps) if s % 150), window_s

    w300 = ckpt.load(first["checkpoint"])
    second = train.fit(tiny(train__num_workers=2, train__steps=303, train__log_every=3, train__ckpt_every=3,
                            run__name="ddp"), verbose=True)
    assert second["step"] == 303
    out = err = ""
    deadline = time.time() + 10  # the workers' lines reach this process asynchronously
    while "Checkpoint successfully created" not in out + err and time.time() < deadline:
        time.sleep(0.25)
        o, e = capfd.readouterr()
        out, err = out + o, err + e
    assert "Checkpoint successfully created" in out + err  # and --verbose shows it
    # Our lines come through the driver's relay, printed by this process itself (not forwarded by Ray with a
    # "(TrainController pid=...)" prefix), once each: a command without --verbose loses none of them.
    lines = out.splitlines()
    assert lines.count("[aigc_ray] worker group of ddp continues at step 300 (" + first["checkpoint"] + ")") == 1
    assert sum(line.startswith("[aigc_ray] step 303/303 (100%)") for line in lines) == 1
    w303 = ckpt.load(second["checkpoint"])
    assert w303["opt_g"]["state"][0]["step"] == 303 and w303["opt_d"]["state"][0]["step"] == 303  # Adam continued
    assert json.loads((Path(second["checkpoint"]) / "meta.json").read_text())["metrics"]["images_seen"] == 303 * 16 * 2
    # The weights continued from step 300 rather than restarting: closer to step 300 than to a fresh init.
    fresh = build_state(resolve(cfg, channels=1, num_classes=10))
    k = "net.0.weight"
    assert (w303["g"][k] - w300["g"][k]).norm() < (w303["g"][k] - fresh.g.state_dict()[k]).norm()


@pytest.mark.parametrize("nodes,workers,cpus,concurrent,want", [
    ([{"CPU": 2}], -1, 0, 1, (1, 2)),  # this machine: one worker on both cores, not two on one each
    ([{"CPU": 2}], -1, 0, 2, (1, 1)),  # two trials at a time share the cores
    ([{"CPU": 0}, {"CPU": 2}], -1, 0, 1, (1, 2)),  # a 0-CPU head holds no worker
    ([{"CPU": 8}, {"CPU": 8}], -1, 0, 1, (2, 8)),  # one worker per node, its threads take the node
    ([{"CPU": 2}, {"CPU": 8}], 2, 0, 1, (2, 4)),  # both workers fit: on the big node, 4 CPUs each
    ([{"CPU": 2}, {"CPU": 8}], 1, 0, 1, (1, 8)),
    ([{"CPU": 16, "GPU": 8}], -1, 0, 1, (8, 2)),  # GPUs: one worker each, the CPUs split among them
    ([{"CPU": 16, "GPU": 8}], -1, 0, 4, (2, 2)),
    ([{"CPU": 2}], 3, 0, 1, (3, 1)),  # more workers than CPUs: check_cluster names the problem
    ([{"CPU": 4}], 1, 3, 1, (1, 3)),  # given values stay
])
def test_auto_workers_and_threads_fit_the_cluster(nodes, workers, cpus, concurrent, want):
    use_gpu = any(n.get("GPU") for n in nodes)
    got = plan.plan_workers(workers, cpus, use_gpu, nodes, concurrent)
    assert got == want
    if workers < 0 or (cpus == 0 and got[0] * concurrent <= sum(n["CPU"] for n in nodes)):
        # Every worker of every concurrent run has a node with room for it.
        free = sorted((int(n["CPU"]) for n in nodes), reverse=True)
        for _ in range(got[0] * concurrent):
            i = next(i for i, f in enumerate(free) if f >= got[1])
            free[i] -= got[1]


def test_auto_layout_uses_this_machine_and_the_progress_line_says_so(ray_cluster, tiny, capsys):
    cfg = tiny(train__num_workers=-1, train__cpus_per_worker=0, train__steps=2, train__log_every=2)
    prepared = train.prepare(cfg)
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    assert (prepared.train.num_workers, prepared.train.cpus_per_worker) == (1, cpus)
    assert plan.layout(prepared) == f"1 worker x {cpus} thread{'s' * (cpus > 1)}"
    local = train.prepare(tiny(train__cpus_per_worker=0))
    assert local.train.num_workers == 0 and local.train.cpus_per_worker == len(__import__("os").sched_getaffinity(0))
    train.fit(tiny(train__cpus_per_worker=0, train__steps=2, train__log_every=2))
    assert "in-process x" in capsys.readouterr().out
