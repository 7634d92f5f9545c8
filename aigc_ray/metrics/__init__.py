"""FID, fid-domain, KID and IS: statistics accumulated per worker, reduced, then pure distances.

    aigc-ray eval --checkpoint runs/demo --metric fid --num-samples 10000 --num-workers 2 --json
    aigc-ray fid-ref --dataset fashion-mnist --split test --extractor inception

Each worker keeps running float64 sums (n, sum x, sum x x^T) of the features of its share of the
images; the sums are added across workers (torch.distributed inside Ray Train, Ray tasks otherwise)
and `frechet_distance` turns two (mean, covariance) pairs into a number. Reference statistics are
cached per (dataset, split, size, extractor) as .npz with a JSON note of how they were made.

What is ours and why: the Frechet distance (an eigendecomposition, ~8x faster than scipy's sqrtm at
2048-d and symmetric by construction), the float64 running sums (reducible across Ray workers, which
torchmetrics' states are only through torch.distributed), and IS from the domain classifier. KID's
polynomial-kernel MMD is torchmetrics' own (`poly_mmd`).
"""

from .distances import (FeatureStats, fid_from_stats, frechet_distance, inception_score, kid, knn_radii,
                        precision_recall)
from .evaluate import METRIC_KEYS, evaluate, evaluate_in_training, has_labels, scoring_data, training_reference
from .fanout import compute, generated_images
from .reference import reference

__all__ = ["FeatureStats", "fid_from_stats", "frechet_distance", "inception_score", "kid", "knn_radii",
           "precision_recall", "METRIC_KEYS", "evaluate", "evaluate_in_training", "has_labels", "scoring_data",
           "training_reference", "compute", "generated_images", "reference"]
