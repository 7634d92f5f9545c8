"""The whole path in one run: search -> train the winner longer -> standard FID -> deploy -> report.

    aigc-ray demo                                   # Fashion-MNIST on a local cluster, ~10 min on 2 CPUs
    ray job submit --working-dir . -- python jobs/pipeline.py --dataset fashion-mnist --name fm

Everything a user can get wrong is checked before the first trial; the deployment is the last step and
a failed one is deleted again, so a bad job never leaves a half-deployed app behind.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from ray import serve

from . import audit, data, metrics, plan, privacy, report, train, tune
from . import storage as storage_mod
from .checkpoint import read_meta
from .config import Config, ConfigError, check_run_name, replace, validate
from .serve import ServeArgs, build_app, token_sha256

DEMO_SPACE = {  # a search that fits a few minutes of 2 CPUs: the learning rates and the loss
    "optim.lr_g": {"loguniform": [1e-4, 1e-3]},
    "optim.lr_d": {"loguniform": [1e-4, 1e-3]},
    "loss.name": {"choice": ["bce", "hinge"]},
}


def ranking_metric(cfg: Config, metric: str = "fid-domain") -> str:
    """fid-domain where its classifier can be had and is not trained on a DP run's private images, else fid."""
    if cfg.privacy.enabled:
        metric = privacy.public_metric(cfg, metric)
    scored = metrics.scoring_data(cfg)
    if metric == "fid-domain" and (scored.dataset.startswith("folder:") or not data.info(scored)[1]):
        return "fid"  # a folder (or CelebA) has no labels for a domain classifier
    return metric


def run(base: Config, *, name: str, num_trials: int = 4, search_steps: int = 300,
        final_steps: int = 1000, final_workers: int = -1, metric: str = "fid-domain", eval_samples: int = 1000,
        fid_samples: int = 500, ref_images: int = 500, space: dict | None = None, max_concurrent: int = 0,
        host: str = "127.0.0.1", port: int = 8000, proxy_location: str = "EveryNode", app_name: str = "aigc",
        api_key: str | None = None, tls: dict | None = None, verbose: bool = False, log=print) -> dict[str, Any]:
    """Run the pipeline on the connected Ray cluster; returns the URL, the report path and the figures."""
    metric = _check(base, name, search_steps, final_steps, final_workers, fid_samples, ref_images, space, metric)
    root = storage_mod.join(storage_mod.root(base), name)  # the location, from the config alone
    stages: dict[str, float] = {}
    t0 = time.time()

    # [1] Search: Ray Tune over Ray Train trials, ranked by the fast domain FID, ASHA stopping laggards.
    log(f"[aigc_ray] 1/5 search: {num_trials} trials x {search_steps} steps, ranked by {metric}")
    best = tune.search(replace(base, {"run.storage": root}), tune.Search(
        name="search", num_trials=num_trials, max_steps=search_steps, metric=metric,
        space=space if space is not None else DEMO_SPACE, eval_every=max(1, search_steps // 3),
        eval_samples=eval_samples, max_concurrent=max_concurrent, seed=base.train.seed), verbose=verbose, log=log)
    log(tune.budget_line(best))
    stages["search"] = time.time() - t0

    # [2] Train the winner longer: resume its Train run with more steps and more workers.
    t1 = time.time()
    on = f" on {final_workers} workers" if final_workers > 0 else ""
    log(f"[aigc_ray] 2/5 train the winner ({best['trial_id']}) to {final_steps} steps{on}")
    every = max(1, search_steps // 3)
    final = train.fit(replace(Config.from_dict(best["config"]), {
        "train.steps": final_steps, "train.num_workers": final_workers,
        "train.cpus_per_worker": base.train.cpus_per_worker, "train.eval_every": every, "train.log_every": every,
        "train.ckpt_every": every, "train.max_failures": 2}), verbose=verbose)
    stages["train"] = time.time() - t1

    # [3] The standard (Inception) FID of the final G_ema, and the audit: does it copy its training images?
    served = _score(final, best, fid_samples, ref_images, stages, log)
    best_json = storage_mod.write_text(storage_mod.join(root, "best.json"), json.dumps(served, indent=2))

    # [4] Deploy to Ray Serve; a failed deployment is removed again.
    t3 = time.time()
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    log(f"[aigc_ray] 4/5 deploy {best_json} to Ray Serve at {url}/")
    _deploy(best_json, host, port, proxy_location, app_name, api_key, tls, verbose)
    stages["deploy"] = time.time() - t3

    # [5] The report, with an image fetched from the live endpoint.
    log("[aigc_ray] 5/5 report")
    stages["total"] = time.time() - t0
    path = report.write(root, search=best, final=final, fid=served["fid"], url=url, stages=stages, api_key=api_key,
                        ca_file=(tls or {}).get("ssl_certfile"), audit=served["audit"], privacy=served["privacy"])
    return {"url": url, "playground": url + "/", "report": str(path), "fid": served["value"],
            "fid_samples": fid_samples, "best_json": best_json, "checkpoint": final["checkpoint"],
            "step": final["step"], "copy_rate": served["audit"].get("copy_rate"), "search_best": best["value"],
            "search_metric": best["metric"], "seconds": round(stages["total"], 1)}


def _check(base: Config, name: str, search_steps: int, final_steps: int, final_workers: int, fid_samples: int,
           ref_images: int, space: dict | None, metric: str) -> str:
    """Everything a user can get wrong, before the first trial; returns the metric the search ranks by."""
    check_run_name(name)
    base = validate(base)
    tune.parse_space(space if space is not None else DEMO_SPACE)
    for key, value in {"final_steps": final_steps, "fid_samples": fid_samples, "ref_images": ref_images}.items():
        if value <= 0:
            raise ConfigError(f"pipeline: {key} must be > 0, got {value}")
    if final_workers == 0 or final_workers < -1:
        raise ConfigError(f"pipeline: final_workers must be > 0, or -1 (auto), got {final_workers}")
    if final_steps < search_steps:
        raise ConfigError(f"pipeline: final_steps ({final_steps}) must be >= search_steps ({search_steps})")
    metric = ranking_metric(base, metric)
    validate(replace(base, {"train.eval_every": 1, "train.eval_metric": metric}))  # scoring a DP run: public data
    train.check_inputs(base)
    plan.check_cluster(replace(base, {"train.num_workers": max(final_workers, 0)}))
    return metric


def _score(final: dict, best: dict, fid_samples: int, ref_images: int, stages: dict, log) -> dict[str, Any]:
    """The standard FID and the audit of the final checkpoint (the audit skipped, and said, where nothing was
    held out): what best.json of the pipeline says, with the privacy statement that covers the whole path."""
    t2 = time.time()
    log(f"[aigc_ray] 3/5 standard FID: {fid_samples} samples vs {ref_images} test images")
    fid = metrics.evaluate(final["checkpoint"], "fid", fid_samples, ref_images=ref_images)
    stages["fid"] = time.time() - t2
    t2 = time.time()
    try:
        found = audit.run(final["checkpoint"], num_samples=fid_samples, heldout=min(1000, ref_images or 1000))
        log(f"[aigc_ray] audit: copy rate {found['copy_rate']:.3f}, MiFID {found['mifid']:.2f} "
            f"({found['features']} features; {found['pairs_png']})")
        audited = audit.summary(found)
    except ConfigError as e:
        log(f"[aigc_ray] audit skipped: {e}")
        audited = {"skipped": str(e)}
    stages["audit"] = time.time() - t2
    return {"checkpoint": final["checkpoint"], "metric": "fid", "value": fid["value"], "step": final["step"],
            "trial_id": best["trial_id"], "search": best["search"], "num_samples": fid_samples,
            "reference_images": fid.get("reference_images"), "audit": audited,
            "privacy": privacy.continued(read_meta(final["checkpoint"]).get("privacy"), best.get("privacy")),
            "config": json.loads(storage_mod.read_text(storage_mod.join(final["checkpoint"], "config.json"))),
            "fid": fid}


def _deploy(best_json: str, host: str, port: int, proxy_location: str, app_name: str, api_key: str | None,
            tls: dict | None, verbose: bool) -> None:
    """The app on Ray Serve, started from best.json; a deployment that fails is deleted again."""
    quiet = None if verbose else {"log_level": "WARNING"}  # Serve's banner and per-request lines: --verbose
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port, **(tls or {})},
                logging_config=quiet)
    try:
        serve.run(build_app(ServeArgs(best=best_json, token_sha256=token_sha256(api_key) if api_key else None)),
                  name=app_name, route_prefix="/", logging_config=quiet)
    except Exception:
        serve.delete(app_name)
        raise
