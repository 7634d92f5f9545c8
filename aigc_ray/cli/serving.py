"""`aigc-ray serve` and `aigc-ray pipeline` (and demo): the service's key, TLS, ingress, and a clean stop.

Each command imports what it uses when it runs (torch, Ray and the modules that pull them in), so
`aigc-ray --help` and a refused flag answer before those load."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import ssl
import time

from ..config import ConfigError
from .common import config_from_args, dry_run, init_ray, there


def choose_ingress(args) -> None:
    """Ray 2.60's HAProxy ingress for a local cluster: replicas serve HTTP themselves, HAProxy balances over
    them and retries a request whose replica died; ~4x the requests/s of the proxy path on 2 CPUs
    (bench/serve_load.py). Kept on loopback and tied to this command (ingress.py). Set before Ray starts."""
    import ray

    from .. import ingress

    if args.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return  # a running cluster (a Ray job: jobs/deploy.py) keeps its own ingress; a redeploy updates the app
    ingress.claim(args.port)  # what a hard-killed predecessor left on the port goes; another holder is named
    if args.ingress == "haproxy" and tls_options(args):  # Ray's HAProxy template has no TLS; Serve's proxy has
        print("[aigc_ray] HTTPS through Serve's proxy (Ray's HAProxy ingress speaks plain HTTP)", flush=True)
    elif args.ingress == "haproxy" and _loopback(args.host):
        for k, v in ingress.haproxy_env(args.port).items():
            os.environ.setdefault(k, v)
    elif args.ingress == "haproxy":  # Ray binds the replicas' own HTTP ports to the same host: keep them in
        print(f"[aigc_ray] serving on {args.host} through Serve's proxy (the HAProxy ingress stays on loopback)",
              flush=True)


def read_key(token_file: str | None) -> str | None:
    """An API key from --token-file, else $AIGC_RAY_TOKEN, else None."""
    if token_file:
        try:
            with open(os.path.expanduser(token_file)) as f:
                return f.read().strip() or None
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise ConfigError(f"--token-file: cannot read {token_file!r}: {getattr(e, 'strerror', None) or e}") from None
    return os.environ.get("AIGC_RAY_TOKEN", "").strip() or None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(args) -> str | None:
    """The service's API key; required when --host is not loopback, and then over HTTPS (or said otherwise)."""
    key = read_key(args.token_file)
    if key is not None and len(key) < 16:
        raise ConfigError("--token-file: the API key must be at least 16 characters (e.g. `openssl rand -hex 32`)")
    if not _loopback(args.host) and key is None:
        raise ConfigError(f"--host {args.host}: serving beyond this machine needs an API key: --token-file FILE "
                          "(or AIGC_RAY_TOKEN); clients then send Authorization: Bearer <key>")
    if not _loopback(args.host) and not tls_options(args) and not args.insecure_http:
        raise ConfigError(f"--host {args.host}: the API key and the images would cross the network in clear text: "
                          "give --tls-cert FILE --tls-key FILE (HTTPS), or --insecure-http behind a gateway that "
                          "terminates TLS")
    return key


def tls_options(args) -> dict[str, str]:
    """Serve's HTTPS options from --tls-cert/--tls-key ({} for plain HTTP); the pair must load."""
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


def scheme(args) -> str:
    return "https" if tls_options(args) else "http"


class _Stop(Exception):
    """SIGTERM (systemd, Kubernetes, `timeout`): stop as Ctrl-C does."""


def wait_for_ctrl_c() -> None:
    """Until Ctrl-C or SIGTERM; either ends in the caller's clean shutdown (never Ray's abort on SIGTERM)."""
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
    if verbose:
        return None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return {"log_level": "WARNING"}


def _serve_args(**kw):
    """ServeArgs, its limits checked before Ray starts: one line naming the flag."""
    from pydantic import ValidationError

    from ..serve import ServeArgs

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
    if not (args.checkpoint or args.best):
        raise ConfigError("serve: give --checkpoint PATH or --best best.json")
    # Everything that can be wrong fails here, before Ray starts; the flags first, before torch and Serve load.
    key, tls = api_key(args), tls_options(args)
    _check_serving(args)
    from ..checkpoint import find, read_best
    from ..serve import build_app, token_sha256

    served = _serve_args(checkpoint=args.checkpoint, best=args.best, max_n=args.max_n,
                         token_sha256=token_sha256(key) if key else None)
    where = there(read_best, args.best, args) if args.best else there(find, args.checkpoint, args)
    if args.dry_run:
        return dry_run(args, f"serve {where} at {scheme(args)}://{args.host}:{args.port}/ with "
                             f"{args.min_replicas}-{args.max_replicas} replicas" + (", API key on" if key else ""))
    choose_ingress(args)
    import ray

    def stop(signum, frame):
        raise _Stop

    if not args.detach:  # SIGTERM from here on (even while starting) ends in the clean shutdown below
        signal.signal(signal.SIGTERM, stop)
    url = f"{scheme(args)}://{args.host}:{args.port}"
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
        wait_for_ctrl_c()
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
    from .. import pipeline, train, tune

    cfg = config_from_args(args)
    space = tune.load_space(args.search_space) if args.search_space else None
    tune.parse_space(space or pipeline.DEMO_SPACE)
    key = api_key(args)
    from ..config import check_run_name, replace, validate

    check_run_name(args.name)
    validate(replace(cfg, {"train.eval_every": 1, "train.eval_metric": pipeline.ranking_metric(cfg)}))
    train.check_inputs(cfg)
    tls_options(args)
    if args.dry_run:
        return dry_run(args, f"search {args.num_trials} trials x {args.search_steps} steps on {cfg.data.dataset}, "
                             f"train the winner to {args.final_steps} steps, score, deploy on port {args.port} and "
                             f"report under {cfg.run.storage}/{args.name}")
    choose_ingress(args)
    # Ray's own chatter (Serve's start-up banner, Train's checkpoint lines) with --verbose only: our lines come
    # from this driver, from the search's reports and through train's relay.
    init_ray(args.address, num_cpus=args.num_cpus, log_to_driver=args.verbose)
    out = pipeline.run(cfg, name=args.name, num_trials=args.num_trials,
                       search_steps=args.search_steps, final_steps=args.final_steps,
                       final_workers=args.final_workers, eval_samples=cfg.train.eval_samples,
                       fid_samples=args.fid_samples, ref_images=args.ref_images, space=space,
                       max_concurrent=args.max_concurrent, host=args.host, port=args.port,
                       proxy_location=args.proxy_location, api_key=key, tls=tls_options(args), verbose=args.verbose)
    print(f"\nDone in {out['seconds']:.0f} s: standard FID {out['fid']:.2f} ({out['fid_samples']} samples).")
    print(f"Playground: {out['playground']}\nReport:     {out['report']}", flush=True)
    if args.keep_serving:
        print("Serving until Ctrl-C.", flush=True)
        wait_for_ctrl_c()
    return out

