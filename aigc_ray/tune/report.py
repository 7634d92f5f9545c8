"""What a search leaves and says: a line per trial report while it runs, then trials.csv, the FID plot, the
PBT lineage and learning-rate plot, the table, best.json (the contract with serving) and the budget line."""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
from ray import tune

from .. import privacy
from .. import storage as storage_mod
from ..checkpoint import CheckpointError, find, read_meta
from ..config import ConfigError
from .pbt import lineage


def Progress(metric_key: str, log=print):
    """The driver's live view of a search (a ray.tune.Callback): one line per trial report with the best so
    far, PBT's copies, failed trials. Tune pickles its callbacks with the search's state, so the class holds
    no closure and drops `log` when pickled (a restored search prints).

    It also keeps every report (`reports`) for trials.csv: Tune's own per-trial record can lose a PBT
    member's reports from before a copy (the restarted member's driver-side result.json is replaced by the
    storage copy, which is only synced now and then)."""
    class _Progress(tune.Callback):
        def __init__(self, metric_key: str, log):
            self.metric_key, self._log, self.best, self.runs, self.reports = metric_key, log, None, {}, []

        def __getstate__(self):
            return {**self.__dict__, "_log": None}

        def _say(self, line: str) -> None:
            (self._log or print)(line)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            tid, step, value = trial.trial_id, result.get("step"), result.get(self.metric_key)
            run = result.get("run")
            self.reports.append({"trial_id": tid, **{k: v for k, v in result.items()
                                                     if isinstance(v, (int, float, str, bool))}})
            if run and self.runs.get(tid) not in (None, run) and run != f"train-{tid}":
                self._say(f"[aigc_ray] trial {tid} copied a better member at step {step}: "
                          f"lr_g={result.get('lr_g'):.3g} lr_d={result.get('lr_d'):.3g} (run {run})")
            self.runs[tid] = run
            if value is None:
                return
            if self.best is None or value < self.best[0]:
                self.best = (value, tid, step)
            self._say(f"[aigc_ray] trial {tid} step {step} {self.metric_key}={value:.2f} "
                      f"{result.get('images_per_s', 0):.0f} img/s | best {self.best[0]:.2f} "
                      f"(trial {self.best[1]}, step {self.best[2]})")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._say(f"[aigc_ray] trial {trial.trial_id} failed; its error is under {trial.path}")

    return _Progress(metric_key, log)


def report(grid, search_dir: str, metric_key: str, max_steps: int, log, scheduler: str = "asha",
           reports: list[dict] = ()) -> dict[str, Any]:
    """trials.csv, the FID plot, the table and best.json from a finished (or resumed) search. reports: what
    the Progress callback saw; with the trials.csv of an earlier pass and Tune's record, every report."""
    frames, rows = [], []
    known = _every_report(grid, search_dir, reports)
    for r in grid:
        trial_id = _trial_id(r)
        df = known.get(trial_id)
        if df is None or df.empty:
            continue
        frames.append(df)
        space = r.config.get("space", {})
        scored = df.dropna(subset=[metric_key]) if metric_key in df else df.iloc[0:0]
        best = scored.loc[scored[metric_key].idxmin()] if len(scored) else None
        rows.append({"trial": trial_id, **{_column(k): _short(v) for k, v in space.items()},
                     "steps": int(df["step"].max()), f"best_{metric_key}": None if best is None else float(best[metric_key]),
                     "best_step": None if best is None else int(best["step"]),
                     "checkpoint": None if best is None or not isinstance(best.get("checkpoint_path"), str)
                     else storage_mod.from_fs_path(best["checkpoint_path"], like=search_dir),
                     "_config": r.config, "error": str(r.error).splitlines()[0] if r.error else ""})
    if not frames:
        raise ConfigError(f"tune: no trial reported a result; see the logs under {search_dir}")
    write = storage_mod.write_text
    write(storage_mod.join(search_dir, "trials.csv"), pd.concat(frames, ignore_index=True).to_csv(index=False))
    storage_mod.write_bytes(storage_mod.join(search_dir, "fid_vs_step.png"), _plot(frames, metric_key))
    copies = lineage(search_dir)
    if copies is not None:
        write(storage_mod.join(search_dir, "pbt_lineage.csv"), copies.to_csv(index=False))
        storage_mod.write_bytes(storage_mod.join(search_dir, "lr_schedules.png"), _plot(frames, "lr_g", "lr_d"))
    table = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_") and k != "checkpoint"} for r in rows])
    table = table.sort_values(f"best_{metric_key}", na_position="last")
    log("\n" + table.to_string(index=False))
    ranked = [r for r in rows if r[f"best_{metric_key}"] is not None and r["checkpoint"]]
    if not ranked:
        raise ConfigError(f"tune: no trial reported {metric_key} with a checkpoint; see {search_dir}")
    win = min(ranked, key=lambda r: r[f"best_{metric_key}"])
    best = {"checkpoint": win["checkpoint"], "metric": metric_key, "value": win[f"best_{metric_key}"],
            "step": win["best_step"], "trial_id": win["trial"], "search": search_dir,
            "config": json.loads(storage_mod.read_text(storage_mod.join(win["checkpoint"], "config.json"))),
            "steps_run": int(sum(r["steps"] for r in rows)), "steps_full_grid": len(rows) * max_steps,
            "copies": 0 if copies is None else len(copies), "scheduler": scheduler,
            "privacy": _search_privacy(rows, win, metric_key)}
    write(storage_mod.join(search_dir, "best.json"), json.dumps(best, indent=2))
    best["best_json"] = storage_mod.join(search_dir, "best.json")
    best["table"] = table.astype(object).where(table.notna(), None).to_dict("records")
    best["worst_value"] = max(r[f"best_{metric_key}"] for r in ranked)
    best["trials"] = len(rows)
    return best


def _trial_id(result) -> str:
    return result.metrics.get("trial_id") or storage_mod.name(result.path)


def _every_report(grid, search_dir: str, reports: list[dict]) -> dict[str, pd.DataFrame]:
    """Each trial's reports in step order, one row per (trial, run, step): Tune's record, the earlier
    trials.csv (a resumed search) and the reports the Progress callback saw, which may hold rows Tune lost."""
    parts = [pd.DataFrame(list(reports))]
    earlier = storage_mod.join(search_dir, "trials.csv")
    if storage_mod.exists(earlier):
        parts.append(pd.read_csv(io.StringIO(storage_mod.read_text(earlier))))
    for r in grid:
        if r.metrics_dataframe is not None and not r.metrics_dataframe.empty:
            parts.append(r.metrics_dataframe.assign(trial_id=_trial_id(r)))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return {}
    every = pd.concat(parts, ignore_index=True)
    every = every.drop_duplicates(subset=[c for c in ("trial_id", "run", "step") if c in every], keep="last")
    return {tid: df.sort_values("step", kind="stable").reset_index(drop=True)
            for tid, df in every.groupby("trial_id", sort=False)}


def _search_privacy(rows: list[dict], win: dict, metric_key: str) -> dict[str, Any] | None:
    """The winner's privacy statement, with what the choice among the DP trials costs (all trials composed)."""
    own = read_meta(win["checkpoint"]).get("privacy")
    if not own:
        return None
    histories = {}
    for r in rows:  # each trial's whole spend: the history of its run's latest checkpoint
        try:
            latest = read_meta(find(storage_mod.parent(r["checkpoint"]))) if r["checkpoint"] else None
        except CheckpointError:
            latest = None
        if latest and latest.get("privacy"):
            histories[r["trial"]] = privacy.history_of(latest["privacy"])
    cfg = win["_config"].get("base", {})
    on = cfg.get("train", {}).get("eval_dataset") or cfg.get("data", {}).get("dataset")
    return {**own, "search": privacy.search_privacy(histories, win["trial"], own["delta"],
                                                    f"{metric_key} on {on}'s test split")}


def _column(key: str) -> str:
    return "loss" if key == "loss.name" else key.split(".")[1]


def _short(v: Any) -> Any:
    return float(f"{v:.3g}") if isinstance(v, float) else v


def _plot(frames, metric_key: str, second: str | None = None) -> bytes:
    """A metric (and a second one, dashed) against step for every trial, as PNG bytes."""
    # Imported here (~0.5 s): every Tune trial's process imports this package and never draws. A bare Figure
    # draws to a file with no pyplot state and no backend to choose.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for df in frames:
        for key, style in ((metric_key, "-"), (second, "--")):
            if key and key in df:
                d = df.dropna(subset=[key])
                ax.plot(d["step"], d[key], style, marker="o", markersize=3,
                        label=f"{str(df['trial_id'].iloc[0])[-5:]} {key if second else ''}".strip())
    ax.set_xlabel("step")
    ax.set_ylabel(metric_key + (f" (solid), {second} (dashed)" if second else ""))
    if all(df[metric_key].dropna().gt(0).all() for df in frames if metric_key in df):
        ax.set_yscale("log")
    ax.set_title("the learning rates PBT found, every member" if second else
                 f"{metric_key} against step, every trial")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def budget_line(best: dict[str, Any]) -> str:
    if best.get("scheduler") == "pbt":
        return (f"PBT: {best['trials']} members, {best['copies']} copies of a better member, "
                f"{best['steps_run']} steps in all")
    saved = 1 - best["steps_run"] / best["steps_full_grid"]
    return (f"ASHA ran {best['steps_run']} of {best['steps_full_grid']} steps a full run of every trial would "
            f"({saved:.0%} saved)")

