"""What every command shares: config flags from the config's fields, the Ray connection, --dry-run, one-line
errors, and the output (human lines, or one JSON line)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..config import MAX_SEED, ConfigError, all_keys, load_config

DRY_RUN = "check everything that can be checked before Ray starts, say what would happen in one line, exit"


def flag_name(key: str) -> str:
    f = all_keys()[key]
    return f.metadata.get("flag") or "--" + key.split(".")[1].replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (the field's comment is its help); only given flags override."""
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config; flags override it")
    for key, f in all_keys().items():
        if key.startswith(skip):
            continue
        flag, dest, helptext = flag_name(key), key.replace(".", "__"), f"{f.metadata['help']} [{f.default}]"
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
        # Ray Train starts a PreemptionWatcher actor (a process, ~2 s of CPU) with every worker group to log node
        # drains of preemptible cloud machines; a cluster of our own has none, and our loop acts on none.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The Train controller takes a worker's report (and sees that it finished) when it polls, every 2 s by
        # default; a worker that reports again before waits. Every 0.5 s: ~3 s less per short run here.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address=address, num_cpus=num_cpus, logging_level="WARNING", log_to_driver=log_to_driver)


def dry_run(args, what: str) -> None:
    """--dry-run: every check that can run before Ray has passed; say what would happen, in one line."""
    if getattr(args, "json", False):
        print(json.dumps({"dry_run": True, "would": what}), flush=True)
    else:
        print(f"[aigc_ray] dry run: would {what}", flush=True)


def there(find, path: str, args) -> str:
    """find(path)'s answer; under --dry-run a path that is not there yet (an earlier step makes it) is fine,
    as long as its storage can be reached."""
    from ..checkpoint import CheckpointError
    from .. import storage

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


def checkpoint_to_score(args, command: str) -> str | None:
    """--checkpoint, or --best's checkpoint; a local Ray cluster (or --address) when Ray tasks share the work.
    None under --dry-run, once it has said what it would do."""
    from ..checkpoint import find, read_best

    if not (args.checkpoint or args.best):
        raise ConfigError(f"{command}: give --checkpoint PATH or --best best.json")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers: must be >= 0, got {args.num_workers}")
    if args.dry_run:
        where = there(read_best, args.best, args) if args.best else there(find, args.checkpoint, args)
        dry_run(args, f"{command} {where} with {args.num_samples} samples (seed {args.seed})")
        return None
    checkpoint = read_best(args.best)["checkpoint"] if args.best else args.checkpoint
    if args.num_workers:
        init_ray(args.address)
    return checkpoint


def out_file(path: str, flag: str = "--out") -> str:
    """A local output path a file system can take (no NUL byte, no name over 255 bytes), else one line."""
    ok = "\x00" not in path and all(len(part.encode("utf-8", "surrogateescape")) <= 255 for part in path.split("/"))
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        ok = False
    if not ok or not path.strip():
        raise ConfigError(f"{flag}: not a file name this machine can write: {path[:80]!r}")
    return path


def check_seed(v: int) -> int:
    if not 0 <= v <= MAX_SEED:
        raise ConfigError(f"--seed: must be in [0, {MAX_SEED}], got {v}")
    return v


def positive(v: int, name: str) -> int:
    if v <= 0:
        raise ConfigError(f"{name}: must be > 0, got {v}")
    return v


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other mistake (`--help` still prints
    the usage)."""

    def error(self, message: str):
        say_error(f"{self.prog}: {message}")
        raise SystemExit(2)


def say_error(message: str) -> None:
    """One line on stderr, whatever bytes the user's arguments held (non-UTF-8 is escaped, never a crash)."""
    line = "aigc-ray: error: " + " ".join(str(message).replace("aigc-ray: ", "", 1).split())
    sys.stderr.write(line.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")
    sys.stderr.flush()

