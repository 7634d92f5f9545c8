"""Train a domain classifier aigc_ray ships (fid-domain's features for Fashion-MNIST or mnist-5k at 32 px) again.

    python bench/domain_classifier.py                # train, report, compare with the shipped weights
    python bench/domain_classifier.py --dataset mnist-5k
    python bench/domain_classifier.py --write        # and replace the shipped file

The shipped classifier makes fid-domain the same yardstick on every machine (as Inception's weights are for
FID) and spares every fresh machine its 2-3 minutes of training. This says whether training it here gives
the same weights, and how far its features are from the shipped ones if not.
"""

import argparse
import json
import time

import torch

from aigc_ray import data
from aigc_ray.config import DataConfig
from aigc_ray.metrics import features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--write", action="store_true", help="replace the shipped file with the one trained here")
    args = p.parse_args()
    cfg = DataConfig(dataset=args.dataset)
    key = features._domain_key(cfg)
    t0 = time.time()
    net, acc = features.train_domain(cfg)
    seconds = time.time() - t0
    shipped = features.SHIPPED / f"{key}.pt"
    same, drift = None, None
    if shipped.is_file():
        old = features._from_bytes(shipped.read_bytes(), key, "cpu")
        new = features.Domain(net, key, acc)
        same = all(torch.equal(a, b) for a, b in zip(old.net.state_dict().values(), net.state_dict().values()))
        images = data.load(cfg, "test").images[:2000]
        f_old, f_new = old(images), new(images)
        drift = float((f_old - f_new).norm(dim=1).mean() / f_old.norm(dim=1).mean())
    print(json.dumps({"key": key, "accuracy": acc, "seconds": round(seconds, 1), "same_weights_as_shipped": same,
                      "feature_drift_vs_shipped": drift}))
    if args.write:
        shipped.parent.mkdir(parents=True, exist_ok=True)
        shipped.write_bytes(features.classifier_bytes(net, acc))
        print(f"wrote {shipped}")


if __name__ == "__main__":
    main()
