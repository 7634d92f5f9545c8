"""Distances between feature sets, pure torch/numpy: the Frechet distance of running float64 sums, KID,
improved precision/recall and IS. Nothing here knows about images, generators or Ray."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError


class FeatureStats:
    """Running float64 sums of features: n, sum(x), sum(x x^T). Add, merge, all-reduce, then mean/cov."""

    def __init__(self, dim: int):
        self.n, self.s1, self.s2 = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> "FeatureStats":
        f = feats.detach().to(torch.float64).cpu()
        self.n += f.shape[0]
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sum over the workers of a torch.distributed group (a no-op outside one)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.s1, self.s2.flatten()])
            dist.all_reduce(flat)
            d = self.s1.shape[0]
            self.n, self.s1, self.s2 = int(flat[0]), flat[1:1 + d], flat[1 + d:].view(d, d)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ConfigError(f"metrics: need at least 2 images for a covariance, got {self.n}")
        mu = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), the Frechet distance of two Gaussians.

    tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2): both roots come from symmetric
    eigendecompositions, so the result is real and symmetric in its arguments.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def kid(f_real: torch.Tensor, f_fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel, mean and std over subsets."""
    # Imported here: torchmetrics pulls in torchvision, torch._dynamo and scipy.signal (~2 s), and every Ray
    # Train worker and Tune trial imports this module without ever computing KID.
    from torchmetrics.image.kid import poly_mmd

    m = min(subset_size, len(f_real), len(f_fake))
    g = torch.Generator().manual_seed(seed)
    vals = torch.stack([poly_mmd(f_real[torch.randperm(len(f_real), generator=g)[:m]].double(),
                                 f_fake[torch.randperm(len(f_fake), generator=g)[:m]].double())
                        for _ in range(subsets)])
    return float(vals.mean()), float(vals.std()) if subsets > 1 else 0.0


def knn_radii(feats: torch.Tensor, k: int = 3, batch: int = 1000) -> torch.Tensor:
    """Each feature's distance to its k-th nearest neighbour in the same set (itself excluded)."""
    f = feats.float()
    return torch.cat([torch.cdist(f[i:i + batch], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), batch)])


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """For each query feature: is it inside some ref feature's k-NN ball (the estimated manifold)?"""
    q, r = query.float(), ref.float()
    return torch.cat([(torch.cdist(q[i:i + batch], r) <= radii[None]).any(1) for i in range(0, len(q), batch)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of fakes inside the
    real manifold (union of k-NN balls of the reals), recall the share of reals inside the fake manifold."""
    precision = _covered(fake, real, knn_radii(real, k)).float().mean()
    recall = _covered(real, fake, knn_radii(fake, k)).float().mean()
    return float(precision), float(recall)


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over splits: 1 for constant predictions, num_classes at best."""
    scores = []
    for part in probs.double().chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part + 1e-12) - torch.log(py + 1e-12))).sum(1).mean()
        scores.append(torch.exp(kl))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std()) if len(s) > 1 else 0.0

