"""The commands that train, search, sample, score, audit, invert, export and forget.

Each command imports what it uses when it runs (torch, Ray and the modules that pull them in), so
`aigc-ray --help` and a refused flag answer before those load."""

from __future__ import annotations

import os

from ..config import ConfigError
from .common import (check_seed, checkpoint_to_score, config_from_args, dry_run, init_ray, out_file, positive,
                     there)
from .serving import read_key


def cmd_train(args) -> dict:
    from .. import train

    cfg = config_from_args(args)
    train.check_inputs(cfg)  # an unusable storage or a missing dataset fails here, before Ray starts
    if args.dry_run:
        return dry_run(args, f"train {cfg.run.name or '(a new run)'} on {cfg.data.dataset} for {cfg.train.steps} "
                             f"steps, {cfg.loss.name} loss, under {cfg.run.storage}")
    init_ray(args.address, log_to_driver=args.verbose)  # our lines come through train's relay
    return train.fit(cfg, verbose=args.verbose)  # workers and threads fitted to the cluster, or one line


def cmd_sample(args) -> dict:
    import torch

    from ..images import grid, save_png

    n = positive(args.n, "--n")
    check_seed(args.seed)
    out_file(args.out)
    if args.truncation is not None and not 0 < args.truncation <= 10:
        raise ConfigError(f"--truncation: must be in (0, 10], got {args.truncation}")
    if args.url:
        from ..client import Client

        client = Client(args.url, token=read_key(args.token_file), ca_file=args.ca_file)
        if args.dry_run:
            return dry_run(args, f"ask {args.url} for {n} images of seed {args.seed} and write {args.out}")
        png = client.grid(n=n, seed=args.seed, truncation=args.truncation, cls=args.cls)
        from pathlib import Path

        Path(args.out).write_bytes(png)
        return {"out": args.out, "n": n, "seed": args.seed, "url": args.url}
    from ..serve import Sampler

    if not (args.checkpoint or args.best):
        raise ConfigError("sample: give --checkpoint PATH, --best best.json (or --url of a running service)")
    if args.dry_run:
        from ..checkpoint import find, read_best

        where = there(read_best, args.best, args) if args.best else there(find, args.checkpoint, args)
        return dry_run(args, f"write {n} images of seed {args.seed} from {where} to {args.out} ({args.format})")
    sampler = Sampler(args.checkpoint, args.best)
    labels = None
    if args.cls is not None:
        from ..serve import class_index

        labels = [class_index(sampler.cfg, args.cls)] * n
    done = {"n": n, "seed": args.seed, "format": args.format, "checkpoint": sampler.path, "step": sampler.meta["step"]}
    if args.format != "grid":
        from ..images import export

        out = export(args.out, args.format, args.seed, n, lambda seeds: sampler.forward(
            sampler.noise(seeds, args.truncation), labels and labels[:len(seeds)]))
        return {"out": str(out), **done}
    # Image i comes from noise(seed + i), exactly as the service draws it: the same seed, the same grid.
    images = sampler.forward(sampler.noise(list(range(args.seed, args.seed + n)), args.truncation), labels)
    out = save_png(args.out, grid(torch.from_numpy(images).permute(0, 3, 1, 2)))
    return {"out": str(out), **done}


def cmd_eval(args) -> dict:
    from .. import metrics

    check_seed(args.seed)
    positive(args.num_samples, "--num-samples")
    checkpoint = checkpoint_to_score(args, "eval")
    if checkpoint is None:
        return None
    r = metrics.evaluate(checkpoint, args.metric, positive(args.num_samples, "--num-samples"),
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
    from .. import audit

    check_seed(args.seed)
    positive(args.num_samples, "--num-samples")
    if args.heldout < 2:
        raise ConfigError(f"--heldout: must be >= 2, got {args.heldout}")
    checkpoint = checkpoint_to_score(args, "audit")
    if checkpoint is None:
        return None
    r = audit.run(checkpoint, num_samples=positive(args.num_samples, "--num-samples"), heldout=args.heldout,
                  features=args.features, dataset=args.dataset, seed=args.seed, out=args.out,
                  num_workers=args.num_workers)
    if not args.json:
        print(f"copy rate {r['copy_rate']:.3f} ({r['num_samples']} samples nearer a training image than "
              f"{r['percentile']:g}% of {r['heldout_images']} held-out images), MiFID {r['mifid']:.2f}, "
              f"{r['features']} features; pairs: {r['pairs_png']}")
    return r


def cmd_fid_ref(args) -> dict:
    from .. import metrics
    from ..config import load_config

    cfg = load_config(None, {"data.dataset": args.dataset, "data.image_size": args.image_size})
    if args.num_workers:
        init_ray(args.address)
    metric = {"inception": "fid", "domain": "fid-domain"}[args.extractor]
    ref = metrics.reference(cfg.data, args.split, metric, num_workers=args.num_workers)
    return {"reference": ref["path"], "images": ref["stats"].n, "extractor": args.extractor}


def cmd_tune(args) -> dict:
    from .. import tune

    cfg = config_from_args(args)
    spec = tune.Search(name=args.name or "search", num_trials=args.num_trials, max_steps=args.max_steps,
                       metric=args.metric, space=tune.load_space(args.search_space),  # None: the scheduler's default
                       workers_per_trial=args.workers_per_trial, gpus_per_trial=args.gpus_per_trial,
                       max_concurrent=args.max_concurrent, searcher=args.searcher, eval_every=cfg.train.eval_every,
                       eval_samples=cfg.train.eval_samples, seed=cfg.train.seed, scheduler=args.scheduler,
                       perturb_every=args.perturb_every, quantile=args.quantile)
    spec.checked()  # a bad space or scheduler fails before Ray starts
    from .. import train
    from ..config import replace, validate

    validate(replace(cfg, {"train.eval_every": 1, "train.eval_metric": args.metric}))  # DP: ranked on public data
    train.check_inputs(cfg)
    if args.dry_run:
        return dry_run(args, f"search {args.num_trials} trials x {args.max_steps} steps on {cfg.data.dataset} "
                             f"({args.scheduler}, ranked by {args.metric}) under {cfg.run.storage}/{args.name}")
    init_ray(args.address, log_to_driver=args.verbose)  # one line per trial report comes from the driver
    best = tune.search(cfg, spec, verbose=args.verbose)
    print(tune.budget_line(best))
    return best


def cmd_invert(args) -> dict:
    """The latent of a photo in a checkpoint's G (GAN inversion): latent.npz, reconstruction.png, loss.png."""
    from .. import storage
    from ..checkpoint import find, load_generator
    from ..invert import invert, photo_tensor, write

    positive(args.steps, "--steps")
    check_seed(args.seed)
    try:
        blob = storage.read_bytes(args.image)
    except storage.StorageError as e:
        raise ConfigError(f"--image: {e}") from None
    if args.dry_run:
        where = there(find, args.checkpoint, args)
        return dry_run(args, f"find {args.image} in {where} ({args.steps} steps) and write {args.out}")
    path = str(find(args.checkpoint))
    g, cfg, _ = load_generator(path)
    photo = photo_tensor(blob, cfg)
    label = None
    if args.cls is not None or cfg.model.conditional:
        from ..serve import class_index

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
    from ..checkpoint import find
    from ..export import export

    out_file(args.out)
    if args.dry_run:
        return dry_run(args, f"export G_ema of {there(find, args.checkpoint, args)} as {args.format} to {args.out}")
    r = export(args.checkpoint, args.format, args.out)
    if not args.json:
        check = (f"max abs difference from `sample`'s pixels: {r['max_abs_pixel_diff']} levels over "
                 f"{r['checked_images']} images" if "max_abs_pixel_diff" in r else r.get("check", ""))
        print(f"wrote {r['out']} ({r['format']}; inputs {', '.join(r['inputs'])}); {check}", flush=True)
        return None
    return r


def cmd_forget(args) -> dict:
    from .. import forget

    store = args.storage or os.environ.get("AIGC_RAY_STORAGE") or "~/aigc_ray/runs"
    return forget.forget(args.dataset, store, yes=args.yes and not args.dry_run, caches=tuple(args.cache or ()))

