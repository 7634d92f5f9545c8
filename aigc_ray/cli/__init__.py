"""The `aigc-ray` command: train, sample, eval, audit, fid-ref, tune, serve, pipeline, demo, forget.

    aigc-ray train --dataset fashion-mnist --loss wgan-gp --num-workers 2 --steps 2000 --name fm-wgan
    aigc-ray sample --checkpoint ~/aigc_ray/runs/fm-wgan --n 64 --seed 0 --out grid.png

Training flags are generated from the config fields (aigc_ray.config holds every default and its help);
`--config FILE` loads a YAML/JSON config and flags override it. A user mistake ends with one line
on stderr and exit status 2, before anything is written.

The parts: common (config flags, Ray, --dry-run, errors, output), parser (the subcommands and their flags),
commands (train, tune, sample, eval, audit, invert, export, forget) and serving (serve, pipeline, demo).
"""

from __future__ import annotations

import sys

from ..config import ConfigError, RunError
from .common import emit, init_ray, say_error
from .parser import build_parser

__all__ = ["build_parser", "init_ray", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already said in one line (2)
        return int(e.code or 0)
    try:
        result = args.fn(args)
    except ConfigError as e:  # every user mistake: one line, exit 2
        say_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("aigc-ray: interrupted", file=sys.stderr)
        return 130
    except RunError as e:  # a run that failed for real (e.g. train.TrainingFailed): one line, exit 1
        say_error(str(e))
        return 1
    if result is not None:
        emit(result, getattr(args, "json", False))
    return 0

