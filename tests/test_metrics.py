"""FID maths against closed forms, extractors, Ray-reduced statistics, and FID on real data."""

import shutil

import numpy as np
import pytest
import torch

from aigc_ray import data, metrics
from aigc_ray.metrics import features
from aigc_ray.config import DataConfig

FASHION = DataConfig(dataset="fashion-mnist")


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("d", [4, 64, 512])
def test_frechet_distance_matches_the_closed_form(d):
    """Covariances sharing eigenvectors: tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i)."""
    rng = np.random.default_rng(d)
    q = _rotation(d, d + 1)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - expected) <= 1e-6 * abs(expected)


def test_frechet_distance_agrees_with_scipy_on_general_covariances():
    from scipy import linalg

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 1
    m1, s1, m2, s2 = x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T)
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g) * 2 + 1
    a, b = metrics.FeatureStats(16).add(fa), metrics.FeatureStats(16).add(fb)
    assert abs(metrics.fid_from_stats(a, a)) < 1e-8
    assert metrics.fid_from_stats(a, b) == pytest.approx(metrics.fid_from_stats(b, a), rel=1e-10)
    merged = metrics.FeatureStats(16).add(fa[:200]).merge(metrics.FeatureStats(16).add(fa[200:]))
    assert torch.allclose(merged.s2, a.s2) and merged.n == 500


def test_kid_and_inception_score_closed_forms():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 8, generator=g)
    mean, _ = metrics.kid(f, f.clone(), subsets=10, subset_size=100)
    far, _ = metrics.kid(f, f + 3, subsets=10, subset_size=100)
    assert abs(mean) < 0.05 < far
    assert metrics.inception_score(torch.full((100, 10), 0.1), splits=5)[0] == pytest.approx(1.0)
    assert metrics.inception_score(torch.eye(10).repeat(10, 1), splits=5)[0] == pytest.approx(10.0, rel=1e-6)


def test_two_ray_workers_give_the_same_fid_as_one_process(ray_cluster):
    cfg = DataConfig(dataset="mnist-5k")
    images = data.load(cfg).images[:600]
    ref = metrics.FeatureStats(128).add(torch.randn(600, 128, generator=torch.Generator().manual_seed(1)))
    one = metrics.compute({"images": images}, "fid-domain", cfg, "stats", num_workers=0)
    two = metrics.compute({"images": images}, "fid-domain", cfg, "stats", num_workers=2)
    assert one.n == two.n == 600
    assert metrics.fid_from_stats(two, ref) == pytest.approx(metrics.fid_from_stats(one, ref), rel=1e-9)


def test_inception_is_the_standard_file_and_returns_2048_features(tmp_path):
    ext = features.Inception()
    out = ext(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    bad = tmp_path / "default_1.pt"
    shutil.copy(features.inception_path(), bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(features.FeatureError, match="sha1"):
        features.Inception(bad)


def test_domain_classifier_is_accurate_on_fashion_mnist():
    ext = features.domain(FASHION)
    assert ext.accuracy >= 0.90
    test = data.load(FASHION, "test")
    pred = ext.probs(test.images[:2000]).argmax(1)
    assert (pred == test.labels[:2000]).float().mean() >= 0.88


def _noise_images(n, seed=0):
    return torch.randint(0, 256, (n, 1, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("metric,n,ratio", [("fid-domain", 2000, 10), ("fid", 100, 3.5)])
def test_train_vs_test_is_small_and_noise_vs_test_is_large(metric, n, ratio):
    """(Inception FID on 100 images carries a large small-sample bias, hence the smaller ratio: train vs test
    94.8 and noise vs test 418.2 here, 4.4x; 150 images gave 76.7 and 414.9.)"""
    train, test = data.load(FASHION, "train"), data.load(FASHION, "test")
    stats = {name: metrics.compute({"images": imgs}, metric, FASHION, "stats")
             for name, imgs in [("train", train.images[:n]), ("test", test.images[:n]), ("noise", _noise_images(n))]}
    real = metrics.fid_from_stats(stats["train"], stats["test"])
    noise = metrics.fid_from_stats(stats["noise"], stats["test"])
    assert noise > ratio * real, (real, noise)


def test_eval_a_checkpoint(tiny, capsys):
    import json

    from aigc_ray import train
    from aigc_ray.cli import main

    out = train.fit(tiny(), quiet=True)
    assert main(["eval", "--checkpoint", out["run_dir"], "--metric", "fid-domain", "--num-samples", "200",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["metric"] == "fid-domain" and r["num_samples"] == 200 and r["value"] > 0
    assert r["reference"].endswith(".npz") and r["seconds"] >= 0
    assert main(["eval", "--checkpoint", out["run_dir"], "--metric", "is", "--num-samples", "100", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1.0 <= r["value"] <= 10.0


def test_fid_domain_refuses_unlabeled_folders(tmp_path):
    with pytest.raises(features.FeatureError, match="only the standard FID"):
        features.train_domain(DataConfig(dataset=f"folder:{tmp_path}"))


def test_training_the_domain_classifier_says_so_before_it_starts_and_learns_the_digits():
    logs = []
    net, acc = features.train_domain(DataConfig(dataset="mnist-5k"), epochs=1, log=logs.append)
    assert len(logs) == 2
    assert logs[0].startswith("[aigc_ray] training the domain classifier") and "5,000 images" in logs[0]
    assert "test accuracy after 39 steps" in logs[1]  # 1 epoch of 5,000 at 128 a step
    assert acc > 0.5  # 10 classes: chance is 0.1
