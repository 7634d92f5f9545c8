"""Precision/recall and the memorization audit, on real images and real features."""

import json

import pytest
import torch

from aigc_ray import audit, data, metrics
from aigc_ray.config import ConfigError, DataConfig
from aigc_ray.metrics.features import extractor

FASHION = DataConfig(dataset="fashion-mnist")


@pytest.fixture(scope="module")
def fm_features():
    """Domain features of 5,000 Fashion-MNIST training images and 2,000 test images."""
    ext = extractor("fid-domain", FASHION)
    train, test = data.load(FASHION, "train"), data.load(FASHION, "test")
    return ext(train.images[:5000]), ext(test.images[:2000]), train.images[:5000]


def test_precision_recall_of_real_vs_real_is_near_one_one(fm_features):
    f_train, f_test, _ = fm_features
    p, r = metrics.precision_recall(f_test, f_train[:2000], k=3)
    assert p > 0.85 and r > 0.85, (p, r)


def test_a_collapsed_generator_has_precision_but_no_recall(fm_features):
    f_train, f_test, _ = fm_features
    collapsed = f_train[7:8].repeat(2000, 1)  # one real image, every time
    p, r = metrics.precision_recall(f_test, collapsed, k=3)
    assert p > 0.9 and r < 0.01, (p, r)


def test_knn_radii_exclude_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert metrics.knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0]


def test_the_audit_flags_a_memorizer_and_not_new_images(fm_features):
    f_train, f_test, _ = fm_features
    held, new = f_test[:1000], f_test[1000:]
    d_held, _ = audit.nearest(held, f_train)
    copies = f_train[torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:1000]]  # verbatim replay
    d_copy, idx = audit.nearest(copies, f_train)
    rate_copy, threshold = audit.copy_rate(d_copy, d_held)
    rate_new, _ = audit.copy_rate(audit.nearest(new, f_train)[0], d_held)
    assert rate_copy > 0.99 and threshold > 0
    assert rate_new < 0.05, rate_new  # new real images: about the 1% the threshold lets through
    assert audit.mifid(50.0, d_copy) > 1000 * 50.0  # copying blows MiFID up
    assert audit.mifid(50.0, torch.full((10,), 0.5)) == pytest.approx(50.0)


def test_nearest_is_cosine_and_names_the_neighbour():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    d, i = audit.nearest(torch.tensor([[0.0, 5.0], [3.0, 0.1]]), ref)
    assert i.tolist() == [1, 0] and d[0] == pytest.approx(0.0, abs=1e-6)


def test_audit_refuses_a_run_with_nothing_held_out(tiny):
    from aigc_ray import train

    out = train.fit(tiny(), quiet=True)
    with pytest.raises(ConfigError, match="no image was held out"):
        audit.run(out["checkpoint"], num_samples=10, heldout=10)


def test_audit_cli_writes_json_and_pairs_of_a_limited_run(tiny, tmp_path, capsys):
    from aigc_ray import train
    from aigc_ray.cli import main

    out = train.fit(tiny(data__limit=200, train__steps=2), quiet=True)
    capsys.readouterr()
    assert main(["audit", "--checkpoint", out["checkpoint"], "--num-samples", "40", "--heldout", "50", "--features",
                 "domain", "--out", str(tmp_path / "audit"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "training photos" in result["note"]  # the pairs image of a run without DP is the owner's, and says so
    assert result["heldout_from"].startswith("training split images 200..249")
    assert 0 <= result["copy_rate"] <= 1 and result["features"] == "domain"
    assert (tmp_path / "audit" / "audit_pairs.png").stat().st_size > 0
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["copy_rate"] == result["copy_rate"]


@pytest.mark.slow
def test_a_model_trained_long_on_eight_images_copies_them_and_a_brief_fashion_model_does_not(tmp_path):
    """1,000 steps on the first 8 digits (1,000 epochs, no augmentation, a high learning rate) against 200
    steps on 5,000 Fashion-MNIST images: the audit must tell them apart clearly. (Here: copy rates 0.57 and 0,
    MiFID 2,409 and ~230; 8 s and 5 s of training.)"""
    from aigc_ray import train
    from aigc_ray.config import Config, replace

    base = {"model.ngf": 16, "model.ndf": 16, "model.latent_dim": 32, "train.num_workers": 0,
            "train.log_every": 500, "run.storage": str(tmp_path / "runs")}
    tiny = train.fit(replace(Config(), {**base, "data.dataset": "mnist-5k", "data.limit": 8, "augment.policy": "none",
                                        "optim.lr_g": 2e-3, "optim.lr_d": 2e-3, "train.batch_size": 8,
                                        "train.steps": 1000, "train.ckpt_every": 1000, "run.name": "eight"}), quiet=True)
    brief = train.fit(replace(Config(), {**base, "data.dataset": "fashion-mnist", "data.limit": 5000, "train.steps": 200,
                                         "train.ckpt_every": 200, "run.name": "brief"}), quiet=True)
    copier = audit.run(tiny["checkpoint"], num_samples=100, heldout=200)
    fresh = audit.run(brief["checkpoint"], num_samples=100, heldout=200)
    assert copier["features"] == fresh["features"] == "domain"
    assert copier["copy_rate"] > 0.3 and fresh["copy_rate"] < 0.05, (copier["copy_rate"], fresh["copy_rate"])
    assert copier["mifid"] > 5 * fresh["mifid"]
