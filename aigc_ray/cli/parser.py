"""The `aigc-ray` parser: a subcommand per command, its flags and the function it runs."""

from __future__ import annotations

import argparse
import sys
import time

from .commands import (cmd_audit, cmd_eval, cmd_export, cmd_fid_ref, cmd_forget, cmd_invert, cmd_sample, cmd_train,
                       cmd_tune)
from .common import DRY_RUN, Parser, add_config_flags
from .serving import cmd_pipeline, cmd_serve


def json_dry_run(p: argparse.ArgumentParser, fn) -> None:
    """The flags every command that reads a checkpoint ends with, and the function it runs."""
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    p.set_defaults(fn=fn)


def pipeline_flags(p: argparse.ArgumentParser, *, name: str, keep_serving: bool) -> None:
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
    proxy_location_flag(p)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster [all]")
    p.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    p.add_argument("--keep-serving", action=argparse.BooleanOptionalAction, default=keep_serving,
                   help="after the report, keep serving until Ctrl-C [on in a terminal]")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.add_argument("--verbose", action="store_true", help="show Ray's own log lines (Train, Tune, Serve) too")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN)


def proxy_location_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proxy-location", default="EveryNode", choices=["EveryNode", "HeadOnly", "Disabled"],
                   help="where Serve runs its HTTP proxies: on every node with a replica, or only on the head "
                        "(several nodes sharing one machine and port) [EveryNode]")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="aigc-ray", description="Train, tune and serve GANs on Ray.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_command(sub)
    _sample_command(sub)
    _tune_command(sub)
    _serve_command(sub)
    _eval_command(sub)
    _audit_command(sub)
    _fid_ref_command(sub)
    _invert_command(sub)
    _export_command(sub)
    _forget_command(sub)
    _pipeline_command(sub)
    _demo_command(sub)
    return p


def _run_flags(p: argparse.ArgumentParser, fn, *, verbose: str) -> None:
    """The flags every command that runs on a Ray cluster ends with (train, tune), and the function it runs."""
    p.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.add_argument("--verbose", action="store_true", help=verbose)
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    p.set_defaults(fn=fn)


def _train_command(sub) -> None:
    t = sub.add_parser("train", help="train or resume a GAN with Ray Train (DDP workers)")
    add_config_flags(t)
    _run_flags(t, cmd_train, verbose="show Ray Train's own log lines too")


def _sample_command(sub) -> None:
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


def _tune_command(sub) -> None:
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
    _run_flags(tn, cmd_tune, verbose="show Ray's own log lines from every worker too")


def _serve_command(sub) -> None:
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
    proxy_location_flag(sv)
    sv.add_argument("--detach", action="store_true", help="return once deployed (the cluster keeps serving)")
    sv.add_argument("--verbose", action="store_true", help="show Ray Serve's own log lines (start-up, every request)")
    sv.add_argument("--address", default=None, help="Ray cluster to use [default: start a local one]")
    sv.add_argument("--json", action="store_true")
    sv.add_argument("--dry-run", action="store_true", help=DRY_RUN)
    sv.set_defaults(fn=cmd_serve)


def _eval_command(sub) -> None:
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
    json_dry_run(e, cmd_eval)


def _audit_command(sub) -> None:
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
    json_dry_run(a, cmd_audit)


def _fid_ref_command(sub) -> None:
    r = sub.add_parser("fid-ref", help="compute (and cache) reference statistics of a dataset split")
    r.add_argument("--dataset", default="fashion-mnist")
    r.add_argument("--split", default="test", choices=["train", "test"])
    r.add_argument("--image-size", type=int, default=32)
    r.add_argument("--extractor", default="inception", choices=["inception", "domain"])
    r.add_argument("--num-workers", type=int, default=0, help="Ray tasks sharing the work [0: this process]")
    r.add_argument("--address", default=None)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_fid_ref)


def _invert_command(sub) -> None:
    iv = sub.add_parser("invert", help="find yourself in the model: the latent whose image matches a photo")
    iv.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    iv.add_argument("--image", required=True, help="the photo (PNG/JPEG; a path or URI)")
    iv.add_argument("--class", dest="cls", default=None, help="whose double: a name or an index (conditional models)")
    iv.add_argument("--steps", type=int, default=200, help="optimisation steps [200]")
    iv.add_argument("--seed", type=int, default=0, help="seed of the random starting latents [0]")
    iv.add_argument("--out", required=True, help="folder for latent.npz, reconstruction.png, loss.png")
    json_dry_run(iv, cmd_invert)


def _export_command(sub) -> None:
    ex = sub.add_parser("export", help="G_ema as TorchScript or ONNX (latent and label in, image out), checked")
    ex.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    ex.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="[onnx]")
    ex.add_argument("--out", required=True, help="the file to write (g.onnx, g.pt)")
    json_dry_run(ex, cmd_export)


def _forget_command(sub) -> None:
    fg = sub.add_parser("forget", help="list (and with --yes delete) everything derived from a folder of photos")
    fg.add_argument("--dataset", required=True, help="folder:PATH, as it was given to train, tune or pipeline")
    fg.add_argument("--storage", default=None, help="where the runs live [$AIGC_RAY_STORAGE, else ~/aigc_ray/runs]")
    fg.add_argument("--cache", action="append", help="another cache folder to search (repeatable)")
    fg.add_argument("--yes", action="store_true", help="delete what is listed (without it: list only)")
    fg.add_argument("--json", action="store_true", help="end with one JSON line of results")
    fg.add_argument("--dry-run", action="store_true", help="list only, even with --yes")
    fg.set_defaults(fn=cmd_forget)


def _pipeline_command(sub) -> None:
    pl = sub.add_parser("pipeline", help="search -> train the winner -> standard FID -> deploy -> report")
    add_config_flags(pl, skip=("run.name", "train.steps", "train.num_workers", "train.eval_metric"))
    pipeline_flags(pl, name="pipeline", keep_serving=False)
    pl.set_defaults(fn=cmd_pipeline)


def _demo_command(sub) -> None:
    dm = sub.add_parser("demo", help="the main job: the pipeline on Fashion-MNIST, on a local Ray cluster")
    dm.set_defaults(fn=cmd_pipeline, config=None, run__storage="runs", train__eval_samples=1000)
    pipeline_flags(dm, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", keep_serving=sys.stdin.isatty())
