"""Hyperparameter search with Ray Tune, ranked by FID, each trial a data-parallel Ray Train run.

    aigc-ray tune --dataset fashion-mnist --num-trials 8 --max-steps 3000 --metric fid-domain --name fm-search

Search-space keys are config keys ("optim.lr_g"); a YAML file (--search-space) replaces the default:

    optim.lr_g: {loguniform: [5e-5, 1e-3]}
    loss.name: {choice: [bce, hinge]}
    model.ngf: {grid: [32, 64]}         # every value, times --num-trials
    train.batch_size: 64                # fixed

Random search by default (optional Optuna TPE: --searcher optuna); ASHA stops trials whose FID lags at
each rung. The search folder gets trials.csv (every reported metric), fid_vs_step.png, and best.json:
the contract with serving (checkpoint, metric, value, step, config, trial id).

The parts: search (the driver and a search's settings), space (search spaces), trial (one trial: a Ray
Train run), pbt (the schedulers, PBT's copies and lineage), report (the live lines, the files, best.json).
"""

from .pbt import make_scheduler
from .report import budget_line
from .search import Search, search
from .space import DEFAULT_SPACE, PBT_MUTABLE, PBT_SPACE, default_space, load_space, parse_space

__all__ = ["DEFAULT_SPACE", "PBT_MUTABLE", "PBT_SPACE", "Search", "budget_line", "default_space", "load_space",
           "make_scheduler", "parse_space", "search"]
