"""The `aigc-ray` command: train, sample, eval, audit, fid-ref, tune, serve, pipeline, demo, forget.

    aigc-ray train --dataset fashion-mnist --loss wgan-gp --num-workers 2 --steps 2000 --name fm-wgan
    aigc-ray sample --checkpoint ~/aigc_ray/runs/fm-wgan --n 64 --seed 0 --out grid.png

Training flags are generated from the config fields (config.py holds every default and its help);
`--config FILE` loads a YAML/JSON config and flags override it. A user mistake ends with one line
on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from .config import ConfigError, RunError, all_keys, load_config


def _flag(key: str) -> str:
    f = all_keys()[key]
    return f.metadata.get("flag") or "--" + key.split(".")[1].replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (the field's comment is its help); only given flags override."""
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config; flags override it")
    for key, f in all_keys().items():
        if key.startswith(skip):
            continue
        flag, dest, helptext = _flag(key), key.replace(".", "__"), f"{f.metadata['help']} [{f.default}]"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if key == "train.use_gpu":
            p.add_argument("--use-gpu", dest=dest, action="store_const", const=True, default=argparse.SUPPRESS,
                           help="train on GPUs [default: when the cluster has them]")
            p.add_argument("--no-gpu", dest=dest, action="store_const", const=False, default=argparse.SUPPRESS,
                           help="train on CPUs even when GPUs are there")
        elif kind.startswith("bool"):
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=helptext)
        else:
            p.add_argument(flag, dest=dest, metavar=key.split(".")[1].upper(), default=argparse.SUPPRESS,
                           help=helptext)


def config_from_args(args: argparse.Namespace):
    overrides = {k.replace("__", "."): v for k, v in vars(args).items() if "__" in k}
    return load_config(args.config, overrides)


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Connect to --address (or RAY_ADDRESS; a job's own cluster), else start a local cluster of this command's
    own: never one that a `ray start` or a killed command left running on this machine. log_to_driver=False
    keeps the workers' own log lines out of this command's output (a search prints its own progress)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # A cluster of our own exports no Prometheus metrics: Ray's exporter, its dashboard's and its autoscaler's
        # metrics servers answer on every interface without a token. (Given a port that cannot be bound, the
        # dashboard and the autoscaler log that and go on without their servers.)
        os.environ.setdefault("RAY_enable_metrics_collection", "0")
        os.environ.setdefault("AUTOSCALER_METRIC_PORT", "-1")
        os.environ.setdefault("DASHBOARD_METRIC_PORT", "-1")
        # Ray Train gives a worker group 60 s to start; on a busy machine importing torch in a fresh worker
        # process takes longer, and the run would fail for it.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    ray.init(address=address, num_cpus=num_cpus, logging_level="WARNING", log_to_driver=log_to_driver)


def dry_run(args, what: str) -> None:
    """--dry-run: every check that can run before Ray has passed; say what would happen, in one line."""
    if getattr(args, "json", False):
        print(json.dumps({"dry_run": True, "would": what}), flush=True)
    else:
        print(f"[aigc_ray] dry run: would {what}", flush=True)


def _there(find, path: str, args) -> str:
    """find(path)'s answer; under --dry-run a path that is not there yet (an earlier step makes it) is fine,
    as long as its storage can be reached."""
    from .checkpoint import CheckpointError
    from . import storage

    try:
        return str(find(path))
    except CheckpointError as e:
        if not args.dry_run or "does not exist" not in str(e):
            raise
        storage.info(storage.parent(storage.normalize(path)))  # unreachable storage still fails
        return f"{path} (not there yet)"


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Human lines, or (with --json) one JSON object as the last line of stdout."""
    if as_json:
        print(json.dumps(result, default=str), flush=True)
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


# ----------------------------------------------------------------------------------------------------


def cmd_train(args) -> dict:
    from . import train

    cfg = config_from_args(args)
    train.check_inputs(cfg)  # an unusable storage or a missing dataset fails here, before Ray starts
    if args.dry_run:
        return dry_run(args, f"train {cfg.run.name or '(a new run)'} on {cfg.data.dataset} for {cfg.train.steps} "
                             f"steps, {cfg.loss.name} loss, under {cfg.run.storage}")
    init_ray(args.address, log_to_driver=args.verbose)  # our lines come through train's relay
    return train.fit(cfg, verbose=args.verbose)  # workers and threads fitted to the cluster, or one line


def cmd_sample(args) -> dict:
    import torch

    from .images import grid, save_png

    n = _positive(args.n, "--n")
    _seed(args.seed)
    _out_file(args.out)
    if args.truncation is not None and not 0 < args.truncation <= 10:
        raise ConfigError(f"--truncation: must be in (0, 10], got {args.truncation}")
    if args.url:
        from .client import Client

        client = Client(args.url, token=_read_key(args.token_file), ca_file=args.ca_file)
        if args.dry_run:
            return dry_run(args, f"ask {args.url} for {n} images of seed {args.seed} and write {args.out}")
        png = client.grid(n=n, seed=args.seed, truncation=args.truncation, cls=args.cls)
        from pathlib import Path

        Path(args.out).write_bytes(png)
        return {"out": args.out, "n": n, "seed": args.seed, "url": args.url}
    from .serve import Sampler

    if not (args.checkpoint or args.best):
        raise ConfigError("sample: give --checkpoint PATH, --best best.json (or --url of a running service)")
    if args.dry_run:
        from .checkpoint import find, read_best

        where = _there(read_best, args.best, args) if args.best else _there(find, args.checkpoint, args)
        return dry_run(args, f"write {n} images of seed {args.seed} from {where} to {args.out} ({args.format})")
    sampler = Sampler(args.checkpoint, args.best)
    labels = None
    if args.cls is not None:
        from .serve import class_index

        labels = [class_index(sampler.cfg, args.cls)] * n
    done = {"n": n, "seed": args.seed, "format": args.format, "checkpoint": sampler.path, "step": sampler.meta["step"]}
    if args.format != "grid":
        from .images import export

        out = export(args.out, args.format, args.seed, n, lambda seeds: sampler.forward(
            sampler.noise(seeds, args.truncation), labels and labels[:len(seeds)]))
        return {"out": str(out), **done}
    # Image i comes from noise(seed + i), exactly as the service draws it: the same seed, the same grid.
    images = sampler.forward(sampler.noise(list(range(args.seed, args.seed + n)), args.truncation), labels)
    out = save_png(args.out, grid(torch.from_numpy(images).permute(0, 3, 1, 2)))
    return {"out": str(out), **done}


def _choose_ingress(args) -> None:
    """Ray 2.60's HAProxy ingress for a local cluster: replicas serve HTTP themselves, HAProxy balances over
    them and retries a request whose replica died; ~4x the requests/s of the proxy path on 2 CPUs
    (bench/serve_load.py). Kept on loopback and tied to this command (ingress.py). Set before Ray starts."""
    import ray

    from . import ingress

    if args.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return  # a running cluster (a Ray job: jobs/deploy.py) keeps its own ingress; a redeploy updates the app
    ingress.claim(args.port)  # what a hard-killed predecessor left on the port goes; another holder is named
    if args.ingress == "haproxy" and _tls(args):  # Ray's HAProxy template has no TLS; Serve's proxy has
        print("[aigc_ray] HTTPS through Serve's proxy (Ray's HAProxy ingress speaks plain HTTP)", flush=True)
    elif args.ingress == "haproxy" and _loopback(args.host):
        for k, v in ingress.haproxy_env(args.port).items():
            os.environ.setdefault(k, v)
    elif args.ingress == "haproxy":  # Ray binds the replicas' own HTTP ports to the same host: keep them in
        print(f"[aigc_ray] serving on {args.host} through Serve's proxy (the HAProxy ingress stays on loopback)",
              flush=True)


def _read_key(token_file: str | None) -> str | None:
    """An API key from --token-file, else $AIGC_RAY_TOKEN, else None."""
    if token_file:
        try:
            with open(os.path.expanduser(token_file)) as f:
                return f.read().strip() or None
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise ConfigError(f"--token-file: cannot read {token_file!r}: {getattr(e, 'strerror', None) or e}") from None
    return os.environ.get("AIGC_RAY_TOKEN", "").strip() or None


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(args) -> str | None:
    """The service's API key; required when --host is not loopback, and then over HTTPS (or said otherwise)."""
    key = _read_key(args.token_file)
    if key is not None and len(key) < 16:
        raise ConfigError("--token-file: the API key must be at least 16 characters (e.g. `openssl rand -hex 32`)")
    if not _loopback(args.host) and key is None:
        raise ConfigError(f"--host {args.host}: serving beyond this machine needs an API key: --token-file FILE "
                          "(or AIGC_RAY_TOKEN); clients then send Authorization: Bearer <key>")
    if not _loopback(args.host) and not _tls(args) and not args.insecure_http:
        raise ConfigError(f"--host {args.host}: the API key and the images would cross the network in clear text: "
                          "give --tls-cert FILE --tls-key FILE (HTTPS), or --insecure-http behind a gateway that "
                          "terminates TLS")
    return key


def _tls(args) -> dict[str, str]:
    """Serve's HTTPS options from --tls-cert/--tls-key ({} for plain HTTP); the pair must load."""
    import ssl

    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if not cert and not key:
        return {}
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key go together: the certificate (PEM, with its chain) and its key")
    cert, key = os.path.abspath(os.path.expanduser(cert)), os.path.abspath(os.path.expanduser(key))
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load {cert} with {key}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return {"ssl_certfile": cert, "ssl_keyfile": key}


def _scheme(args) -> str:
    return "https" if _tls(args) else "http"


class _Stop(Exception):
    """SIGTERM (systemd, Kubernetes, `timeout`): stop as Ctrl-C does."""


def _wait_for_ctrl_c() -> None:
    """Until Ctrl-C or SIGTERM; either ends in the caller's clean shutdown (never Ray's abort on SIGTERM)."""
    import signal

    def stop(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve_logging(verbose: bool) -> dict | None:
    """Serve's own INFO lines (start-up banner, every request of every replica) only with --verbose."""
    import logging

    if verbose:
        return None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return {"log_level": "WARNING"}


def _serve_args(**kw):
    """ServeArgs, its limits checked before Ray starts: one line naming the flag."""
    from pydantic import ValidationError

    from .serve import ServeArgs

    try:
        return ServeArgs(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else "args"
        raise ConfigError(f"--{field.replace('_', '-')}: {err['msg'].lower()}, got {err.get('input')!r}") from None


def _check_serving(args) -> None:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: must be in 1..65535, got {args.port}")
    if not 1 <= args.min_replicas <= args.max_replicas:
        raise ConfigError(f"--min-replicas/--max-replicas: need 1 <= min <= max, got {args.min_replicas} and "
                          f"{args.max_replicas}")
    for flag in ("num_cpus", "num_gpus"):
        v = getattr(args, flag)
        if not v >= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 0, got {v}")
    for flag in ("max_ongoing_requests", "max_queued_requests"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")


def cmd_serve(args) -> dict:
    """Serve a checkpoint (or best.json) on a local Ray cluster until Ctrl-C."""
    from .serve import build_app, token_sha256

    if not (args.checkpoint or args.best):
        raise ConfigError("serve: give --checkpoint PATH or --best best.json")
    from .checkpoint import find, read_best

    # Everything that can be wrong fails here, before Ray starts.
    key, tls = _api_key(args), _tls(args)
    _check_serving(args)
    served = _serve_args(checkpoint=args.checkpoint, best=args.best, max_n=args.max_n,
                         token_sha256=token_sha256(key) if key else None)
    where = _there(read_best, args.best, args) if args.best else _there(find, args.checkpoint, args)
    if args.dry_run:
        return dry_run(args, f"serve {where} at {_scheme(args)}://{args.host}:{args.port}/ with "
                             f"{args.min_replicas}-{args.max_replicas} replicas" + (", API key on" if key else ""))
    _choose_ingress(args)
    import signal

    import ray

    def stop(signum, frame):
        raise _Stop

    if not args.detach:  # SIGTERM from here on (even while starting) ends in the clean shutdown below
        signal.signal(signal.SIGTERM, stop)
    url = f"{_scheme(args)}://{args.host}:{args.port}"
    try:
        # The replicas' and the controller's own lines (Serve's start-up banner, every request) with --verbose only.
        init_ray(args.address, log_to_driver=args.verbose)
        from ray import serve

        quiet = _serve_logging(args.verbose)
        serve.start(proxy_location=args.proxy_location, http_options={"host": args.host, "port": args.port, **tls},
                    logging_config=quiet)
        app = build_app(served, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                        num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_ongoing_requests=args.max_ongoing_requests,
                        max_queued_requests=args.max_queued_requests)
        serve.run(app, name="aigc", route_prefix="/", logging_config=quiet)
        print(f"Serving at {url}/  (playground), {url}/docs (API). Ctrl-C or SIGTERM stops.", flush=True)
        if args.detach:
            return {"url": url}
        _wait_for_ctrl_c()
    except _Stop:
        pass
    print("[aigc_ray] stopping: draining requests, then the replicas and the ingress", flush=True)
    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return {"url": url}


def cmd_pipeline(args) -> dict:
    """search -> train the winner longer -> standard FID -> deploy -> report, on the connected cluster."""
    from . import pipeline, train, tune

    cfg = config_from_args(args)
    space = tune.load_space(args.search_space) if args.search_space else None
    tune.parse_space(space or pipeline.DEMO_SPACE)
    key = _api_key(args)
    from .config import check_run_name, replace, validate

    check_run_name(args.name)
    validate(replace(cfg, {"train.eval_every": 1, "train.eval_metric": pipeline.ranking_metric(cfg)}))
    train.check_inputs(cfg)
    _tls(args)
    if args.dry_run:
        return dry_run(args, f"search {args.num_trials} trials x {args.search_steps} steps on {cfg.data.dataset}, "
                             f"train the winner to {args.final_steps} steps, score, deploy on port {args.port} and "
                             f"report under {cfg.run.storage}/{args.name}")
    _choose_ingress(args)
    # Ray's own chatter (Serve's start-up banner, Train's checkpoint lines) with --verbose only: our lines come
    # from this driver, from the search's reports and through train's relay.
    init_ray(args.address, num_cpus=args.num_cpus, log_to_driver=args.verbose)
    out = pipeline.run(cfg, name=args.name, num_trials=args.num_trials,
                       search_steps=args.search_steps, final_steps=args.final_steps,
                       final_workers=args.final_workers, eval_samples=cfg.train.eval_samples,
                       fid_samples=args.fid_samples, ref_images=args.ref_images, space=space,
                       max_concurrent=args.max_concurrent, host=args.host, port=args.port,
                       proxy_location=args.proxy_location, api_key=key, tls=_tls(args), verbose=args.verbose)
    print(f"\nDone in {out['seconds']:.0f} s: standard FID {out['fid']:.2f} ({out['fid_samples']} samples).")
    print(f"Playground: {out['playground']}\nReport:     {out['report']}", flush=True)
    if args.keep_serving:
        print("Serving until Ctrl-C.", flush=True)
        _wait_for_ctrl_c()
    return out


def _checkpoint_to_score(args, command: str) -> str | None:
    """--checkpoint, or --best's checkpoint; a local Ray cluster (or --address) when Ray tasks share the work.
    None under --dry-run, once it has said what it would do."""
    from .checkpoint import find, read_best

    if not (args.checkpoint or args.best):
        raise ConfigError(f"{command}: give --checkpoint PATH or --best best.json")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers: must be >= 0, got {args.num_workers}")
    if args.dry_run:
        where = _there(read_best, args.best, args) if args.best else _there(find, args.checkpoint, args)
        dry_run(args, f"{command} {where} with {args.num_samples} samples (seed {args.seed})")
        return None
    checkpoint = read_best(args.best)["checkpoint"] if args.best else args.checkpoint
    if args.num_workers:
        init_ray(args.address)
    return checkpoint


def cmd_eval(args) -> dict:
    from . import metrics

    _seed(args.seed)
    _positive(args.num_samples, "--num-samples")
    checkpoint = _checkpoint_to_score(args, "eval")
    if checkpoint is None:
        return None
    r = metrics.evaluate(checkpoint, args.metric, _positive(args.num_samples, "--num-samples"),
                         split=args.split, num_workers=args.num_workers, seed=args.seed)
    if not args.json and args.metric == "precision-recall":
        dom = (f"; domain features: precision {r['precision_domain']:.3f}, recall {r['recall_domain']:.3f}"
               if "precision_domain" in r else "")
        print(f"precision {r['precision']:.3f}, recall {r['recall']:.3f} (Inception, k=3){dom} "
              f"({r['num_samples']} samples, step {r['step']}, {r['seconds']} s)")
    elif not args.json:
        std = f" +- {r['std']:.4g}" if "std" in r else ""
        print(f"{args.metric} = {r['value']:.4f}{std} ({r['num_samples']} samples, step {r['step']}, {r['seconds']} s)")
    return r


def cmd_audit(args) -> dict:
    from . import audit

    _seed(args.seed)
    _positive(args.num_samples, "--num-samples")
    if args.heldout < 2:
        raise ConfigError(f"--heldout: must be >= 2, got {args.heldout}")
    checkpoint = _checkpoint_to_score(args, "audit")
    if checkpoint is None:
        return None
    r = audit.run(checkpoint, num_samples=_positive(args.num_samples, "--num-samples"), heldout=args.heldout,
                  features=args.features, dataset=args.dataset, seed=args.seed, out=args.out,
                  num_workers=args.num_workers)
    if not args.json:
        print(f"copy rate {r['copy_rate']:.3f} ({r['num_samples']} samples nearer a training image than "
              f"{r['percentile']:g}% of {r['heldout_images']} held-out images), MiFID {r['mifid']:.2f}, "
              f"{r['features']} features; pairs: {r['pairs_png']}")
    return r


def cmd_fid_ref(args) -> dict:
    from . import metrics
    from .config import load_config

    cfg = load_config(None, {"data.dataset": args.dataset, "data.image_size": args.image_size})
    if args.num_workers:
        init_ray(args.address)
    metric = {"inception": "fid", "domain": "fid-domain"}[args.extractor]
    ref = metrics.reference(cfg.data, args.split, metric, num_workers=args.num_workers)
    return {"reference": ref["path"], "images": ref["stats"].n, "extractor": args.extractor}


def cmd_tune(args) -> dict:
    from . import tune
    from .config import check_run_name

    cfg = config_from_args(args)
    check_run_name(args.name or "search")
    space = tune.load_space(args.search_space)  # None: the scheduler's default space
    tune.check_search(space=space, scheduler=args.scheduler, num_trials=args.num_trials, max_steps=args.max_steps,
                      searcher=args.searcher, eval_every=cfg.train.eval_every, perturb_every=args.perturb_every,
                      quantile=args.quantile)  # a bad space or scheduler fails before Ray starts
    from . import train
    from .config import replace, validate

    validate(replace(cfg, {"train.eval_every": 1, "train.eval_metric": args.metric}))  # DP: ranked on public data
    train.check_inputs(cfg)
    if args.workers_per_trial < 1 or args.gpus_per_trial < 0 or args.max_concurrent < 0:
        raise ConfigError("tune: --workers-per-trial must be >= 1, --gpus-per-trial and --max-concurrent >= 0")
    if args.dry_run:
        return dry_run(args, f"search {args.num_trials} trials x {args.max_steps} steps on {cfg.data.dataset} "
                             f"({args.scheduler}, ranked by {args.metric}) under {cfg.run.storage}/{args.name}")
    init_ray(args.address, log_to_driver=args.verbose)  # one line per trial report comes from the driver
    best = tune.search(cfg, name=args.name or "search", num_trials=args.num_trials,
                       max_steps=args.max_steps, metric=args.metric, space=space,
                       workers_per_trial=args.workers_per_trial, gpus_per_trial=args.gpus_per_trial,
                       max_concurrent=args.max_concurrent, searcher=args.searcher,
                       eval_every=cfg.train.eval_every, eval_samples=cfg.train.eval_samples,
                       scheduler=args.scheduler, perturb_every=args.perturb_every, quantile=args.quantile,
                       seed=cfg.train.seed, verbose=args.verbose)
    print(tune.budget_line(best))
    return best


def cmd_invert(args) -> dict:
    """The latent of a photo in a checkpoint's G (GAN inversion): latent.npz, reconstruction.png, loss.png."""
    from . import storage
    from .checkpoint import find, load_generator
    from .invert import invert, photo_tensor, write

    _positive(args.steps, "--steps")
    _seed(args.seed)
    try:
        blob = storage.read_bytes(args.image)
    except storage.StorageError as e:
        raise ConfigError(f"--image: {e}") from None
    if args.dry_run:
        where = _there(find, args.checkpoint, args)
        return dry_run(args, f"find {args.image} in {where} ({args.steps} steps) and write {args.out}")
    path = str(find(args.checkpoint))
    g, cfg, _ = load_generator(path)
    photo = photo_tensor(blob, cfg)
    label = None
    if args.cls is not None or cfg.model.conditional:
        from .serve import class_index

        if args.cls is None:
            raise ConfigError("--class: this model is conditional: say whose double (a name or an index)")
        label = class_index(cfg, args.cls)
    inv = invert(g, cfg, photo, label=label, steps=args.steps, seed=args.seed)
    names = list(cfg.model.class_names)
    r = write(args.out, inv, photo, names[label] if label is not None and label < len(names) else None)
    if not args.json:
        print(f"wrote {r['out']}/latent.npz, reconstruction.png, loss.png: {r['steps']} steps, pixel error "
              f"{r['pixel_error']:.1f} levels, {r['seconds']} s", flush=True)
        return None
    return r


def cmd_export(args) -> dict:
    from .checkpoint import find
    from .export import export

    _out_file(args.out)
    if args.dry_run:
        return dry_run(args, f"export G_ema of {_there(find, args.checkpoint, args)} as {args.format} to {args.out}")
    r = export(args.checkpoint, args.format, args.out)
    if not args.json:
        check = (f"max abs difference from `sample`'s pixels: {r['max_abs_pixel_diff']} levels over "
                 f"{r['checked_images']} images" if "max_abs_pixel_diff" in r else r.get("check", ""))
        print(f"wrote {r['out']} ({r['format']}; inputs {', '.join(r['inputs'])}); {check}", flush=True)
        return None
    return r


def cmd_forget(args) -> dict:
    from . import forget

    store = args.storage or os.environ.get("AIGC_RAY_STORAGE") or "~/aigc_ray/runs"
    return forget.forget(args.dataset, store, yes=args.yes and not args.dry_run, caches=tuple(args.cache or ()))


def _pipeline_flags(p: argparse.ArgumentParser, *, name: str, keep_serving: bool) -> None:
    p.add_argument("--name", default=name, help=f"pipeline folder under --storage [{name}]")
    p.add_argument("--num-trials", type=int, default=4, help="search trials [4]")
    p.add_argument("--search-steps", type=int, default=300, help="steps of a search trial (ASHA may stop it) [300]")
    p.add_argument("--final-steps", type=int, default=1000, help="steps the winner is trained to [1000]")
    p.add_argument("--final-workers", type=int, default=-1,
                   help="Ray Train workers for the winner [-1: auto, one per GPU, else one per node]")
    p.add_argument("--fid-samples", type=int, default=500, help="samples for the standard FID [500]")
    p.add_argument("--ref-images", type=int, default=500, help="test images for the FID reference [500]")
    p.add_argument("--search-space", metavar="FILE", help="YAML search space [learning rates and loss]")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once [0: as the CPUs allow]")
    p.add_argument("--host", default="127.0.0.1", help="address Serve binds [127.0.0.1]; another needs --token-file")
    p.add_argument("--token-file", metavar="FILE", help="API key of the service [$AIGC_RAY_TOKEN]")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP port [8000]")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM, with its chain)")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    p.add_argument("--insecure-http", action="store_true",
                    help="allow plain HTTP on a non-loopback --host (only behind a gateway that terminates TLS)")
    p.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"], help="on a local cluster [haproxy]")
    _proxy_location_flag(p)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster [all]")
    p.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    p.add_argument("--keep-serving", action=argparse.BooleanOptionalAction, default=keep_serving,
                   help="after the report, keep serving until Ctrl-C [on in a terminal]")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines (Train, Tune, Serve) too")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN)


def _proxy_location_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly", "Disabled"],
                   help="where Serve runs its HTTP proxies: on every node with a replica, or only on the head "
                        "(several nodes sharing one machine and port) [EveryNode]")


def _out_file(path: str, flag: str = "--out") -> str:
    """A local output path a file system can take (no NUL byte, no name over 255 bytes), else one line."""
    ok = "\x00" not in path and all(len(part.encode("utf-8", "surrogateescape")) <= 255 for part in path.split("/"))
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        ok = False
    if not ok or not path.strip():
        raise ConfigError(f"{flag}: not a file name this machine can write: {path[:80]!r}")
    return path


def _seed(v: int) -> int:
    from .config import MAX_SEED

    if not 0 <= v <= MAX_SEED:
        raise ConfigError(f"--seed: must be in [0, {MAX_SEED}], got {v}")
    return v


def _positive(v: int, name: str) -> int:
    if v <= 0:
        raise ConfigError(f"{name}: must be > 0, got {v}")
    return v


# ----------------------------------------------------------------------------------------------------


DRY_RUN = "check everything that can be checked before Ray starts, say what would happen in one line, exit"


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other mistake (`--help` still prints
    the usage)."""

    def error(self, message: str):
        _say_error(f"{self.prog}: {message}")
        raise SystemExit(2)


def _say_error(message: str) -> None:
    """One line on stderr, whatever bytes the user's arguments held (non-UTF-8 is escaped, never a crash)."""
    line = "aigc-ray: error: " + " ".join(str(message).replace("aigc-ray: ", "", 1).split())
    sys.stderr.write(line.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")
    sys.stderr.flush()


def _json_dry_run(p: argparse.ArgumentParser, fn) -> None:
    """The flags every command that reads a checkpoint ends with, and the function it runs."""
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    p.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="aigc-ray", description="Train, tune and serve GANs on Ray.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train or resume a GAN with Ray Train (DDP workers)")
    add_config_flags(t)
    t.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    t.add_argument("--json", action="store_true", help="end with one JSON line of results")
    t.add_argument("--verbose", action="store_true", help="show Ray Train's own log lines too")
    t.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="a grid of images from a checkpoint's G_ema (or a running service)")
    s.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest); a path or s3://... URI")
    s.add_argument("--best", help="best.json of a search (a path or URI): sample its checkpoint")
    s.add_argument("--url", help="sample from a running aigc-ray service instead, e.g. http://127.0.0.1:8000")
    s.add_argument("--token-file", metavar="FILE", help="the service's API key, with --url [$AIGC_RAY_TOKEN]")
    s.add_argument("--ca-file", metavar="FILE", help="with an https:// --url: the CA (or self-signed certificate) "
                   "to trust [the system's CAs]")
    s.add_argument("--n", type=int, default=64, help="images in the grid [64]")
    s.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same images [0]")
    s.add_argument("--truncation", type=float, default=None, help="redraw |z| above this (truncation trick)")
    s.add_argument("--class", dest="cls", default=None,
                   help="class of a conditional model: its index or its name (a person's folder name, e.g. alice)")
    s.add_argument("--format", choices=("grid", "png-dir", "npz"), default="grid",
                   help="grid: one PNG; png-dir: a folder of <seed>.png (for clean-fid, torch-fidelity); "
                        "npz: one uint8 NHWC array 'images' with their 'seeds' [grid]")
    s.add_argument("--out", default="grid.png", help="the PNG, folder or .npz to write [grid.png]")
    s.add_argument("--json", action="store_true", help="end with one JSON line of results")
    s.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    s.set_defaults(fn=cmd_sample)

    tn = sub.add_parser("tune", help="search hyperparameters with Ray Tune, ranked by FID (ASHA early stopping)")
    add_config_flags(tn, skip=("run.name", "train.steps", "train.num_workers", "train.use_gpu", "train.eval_metric"))
    tn.add_argument("--name", default="search", help="search name; the same name again resumes it [search]")
    tn.add_argument("--num-trials", type=int, default=8, help="trials (samples of the space) [8]")
    tn.add_argument("--max-steps", type=int, default=3000, help="steps of a trial that ASHA never stops [3000]")
    tn.add_argument("--metric", default="fid-domain", choices=["fid-domain", "fid"], help="rank by [fid-domain]")
    tn.add_argument("--search-space", metavar="FILE", help="YAML search space (replaces the default)")
    tn.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers in each trial [1]")
    tn.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (one per worker) [0]")
    tn.add_argument("--max-concurrent", type=int, default=0, help="trials at once [0: as the CPUs allow]")
    tn.add_argument("--searcher", default="random", choices=["random", "optuna"], help="[random]")
    tn.add_argument("--scheduler", default="asha", help="asha: stop laggards at rungs; pbt: Population Based "
                    "Training (the worst members copy the best and perturb their learning rates, betas, n_critic, "
                    "EMA decay, loss weights); none [asha]")
    tn.add_argument("--perturb-every", type=int, default=0, help="PBT: steps between copies [0: --eval-every]")
    tn.add_argument("--quantile", type=float, default=0.25, help="PBT: share of members that copy / are copied [0.25]")
    tn.add_argument("--verbose", action="store_true", help="show Ray's own log lines from every worker too")
    tn.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    tn.add_argument("--json", action="store_true", help="end with one JSON line of results")
    tn.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    tn.set_defaults(fn=cmd_tune)

    sv = sub.add_parser("serve", help="serve a checkpoint with Ray Serve (HTTP, batching, autoscaling)")
    sv.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest); a path or s3://... URI")
    sv.add_argument("--best", help="best.json of a search (a path or URI)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind [127.0.0.1]; any other (0.0.0.0 exposes the service) needs --token-file")
    sv.add_argument("--token-file", metavar="FILE",
                    help="API key (>= 16 characters): every endpoint but / and /healthz then needs "
                         "Authorization: Bearer <key> [$AIGC_RAY_TOKEN]")
    sv.add_argument("--port", type=int, default=8000, help="[8000]")
    sv.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM, with its chain)")
    sv.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    sv.add_argument("--insecure-http", action="store_true",
                    help="allow plain HTTP on a non-loopback --host (only behind a gateway that terminates TLS)")
    sv.add_argument("--max-n", type=int, default=64, help="most images per request [64]")
    sv.add_argument("--min-replicas", type=int, default=1)
    sv.add_argument("--max-replicas", type=int, default=1)
    sv.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica [1]")
    sv.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica [0]")
    sv.add_argument("--max-ongoing-requests", type=int, default=128, help="requests a replica works on at once [128]")
    sv.add_argument("--max-queued-requests", type=int, default=512,
                    help="requests a replica holds beyond those; past that: 503 with Retry-After, at once [512]")
    sv.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"],
                    help="HTTP path on a local cluster: Ray 2.60's HAProxy + direct ingress, or the classic proxy")
    _proxy_location_flag(sv)
    sv.add_argument("--detach", action="store_true", help="return once deployed (the cluster keeps serving)")
    sv.add_argument("--verbose", action="store_true", help="show Ray Serve's own log lines (start-up, every request)")
    sv.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    sv.add_argument("--json", action="store_true")
    sv.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    sv.set_defaults(fn=cmd_serve)

    e = sub.add_parser("eval", help="FID / fid-domain / KID / IS of a checkpoint's G_ema")
    e.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest); a path or s3://... URI")
    e.add_argument("--best", help="best.json of a search (a path or URI): evaluate its checkpoint")
    e.add_argument("--metric", default="fid", choices=["fid", "fid-domain", "kid", "is", "precision-recall"],
                   help="fid: standard Inception FID; fid-domain: FID in the domain classifier's features; "
                   "precision-recall: k-NN precision and recall (k=3) in both [fid]")
    e.add_argument("--num-samples", type=int, default=10000, help="generated images [10000]")
    e.add_argument("--split", default="test", choices=["train", "test"], help="reference split [test]")
    e.add_argument("--num-workers", type=int, default=0, help="Ray tasks sharing the work [0: this process]")
    e.add_argument("--seed", type=int, default=0, help="noise seed of the generated set [0]")
    e.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    _json_dry_run(e, cmd_eval)

    a = sub.add_parser("audit", help="memorization audit: copy rate, MiFID and the closest sample/training pairs")
    a.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest); a path or s3://... URI")
    a.add_argument("--best", help="best.json of a search (a path or URI): audit its checkpoint")
    a.add_argument("--dataset", default=None, help="training images to compare with [the run's own]")
    a.add_argument("--num-samples", type=int, default=1000, help="generated images [1000]")
    a.add_argument("--heldout", type=int, default=1000, help="held-out real images that calibrate 'close' [1000]")
    a.add_argument("--features", default="auto", choices=["auto", "inception", "domain"],
                   help="auto: the domain classifier where the dataset has labels, else Inception [auto]")
    a.add_argument("--out", default=None, help="folder for audit.json and audit_pairs.png [<run>/audit/stepN]")
    a.add_argument("--num-workers", type=int, default=0, help="Ray tasks sharing the features [0: this process]")
    a.add_argument("--seed", type=int, default=0, help="noise seed of the samples [0]")
    a.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    _json_dry_run(a, cmd_audit)

    r = sub.add_parser("fid-ref", help="compute (and cache) reference statistics of a dataset split")
    r.add_argument("--dataset", default="fashion-mnist")
    r.add_argument("--split", default="test", choices=["train", "test"])
    r.add_argument("--image-size", type=int, default=32)
    r.add_argument("--extractor", default="inception", choices=["inception", "domain"])
    r.add_argument("--num-workers", type=int, default=0, help="Ray tasks sharing the work [0: this process]")
    r.add_argument("--address", default=None)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_fid_ref)

    iv = sub.add_parser("invert", help="find yourself in the model: the latent whose image matches a photo")
    iv.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    iv.add_argument("--image", required=True, help="the photo (PNG/JPEG; a path or URI)")
    iv.add_argument("--class", dest="cls", default=None, help="whose double: a name or an index (conditional models)")
    iv.add_argument("--steps", type=int, default=200, help="optimisation steps [200]")
    iv.add_argument("--seed", type=int, default=0, help="seed of the random starting latents [0]")
    iv.add_argument("--out", required=True, help="folder for latent.npz, reconstruction.png, loss.png")
    _json_dry_run(iv, cmd_invert)

    ex = sub.add_parser("export", help="G_ema as TorchScript or ONNX (latent and label in, image out), checked")
    ex.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    ex.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="[onnx]")
    ex.add_argument("--out", required=True, help="the file to write (g.onnx, g.pt)")
    _json_dry_run(ex, cmd_export)

    fg = sub.add_parser("forget", help="list (and with --yes delete) everything derived from a folder of photos")
    fg.add_argument("--dataset", required=True, help="folder:PATH, as it was given to train, tune or pipeline")
    fg.add_argument("--storage", default=None, help="where the runs live [$AIGC_RAY_STORAGE, else ~/aigc_ray/runs]")
    fg.add_argument("--cache", action="append", help="another cache folder to search (repeatable)")
    fg.add_argument("--yes", action="store_true", help="delete what is listed (without it: list only)")
    fg.add_argument("--json", action="store_true", help="end with one JSON line of results")
    fg.add_argument("--dry-run", action="store_true", help="list only, even with --yes")
    fg.set_defaults(fn=cmd_forget)

    pl = sub.add_parser("pipeline", help="search -> train the winner -> standard FID -> deploy -> report")
    add_config_flags(pl, skip=("run.name", "train.steps", "train.num_workers", "train.eval_metric"))
    _pipeline_flags(pl, name="pipeline", keep_serving=False)
    pl.set_defaults(fn=cmd_pipeline)

    dm = sub.add_parser("demo", help="the main job: the pipeline on Fashion-MNIST, on a local Ray cluster")
    dm.set_defaults(fn=cmd_pipeline, config=None, run__storage="runs", train__eval_samples=1000)
    _pipeline_flags(dm, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", keep_serving=sys.stdin.isatty())
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already said in one line (2)
        return int(e.code or 0)
    try:
        result = args.fn(args)
    except ConfigError as e:  # every user mistake: one line, exit 2
        _say_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("aigc-ray: interrupted", file=sys.stderr)
        return 130
    except RunError as e:  # a run that failed for real (e.g. train.TrainingFailed): one line, exit 1
        _say_error(str(e))
        return 1
    if result is not None:
        emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
