"""Training under real worker kills: the group restarts from the last checkpoint, or fails clearly."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from aigc_ray import checkpoint as ckpt
from aigc_ray import train


def _complete(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir() and ckpt.is_complete(p)}


def _alive_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def _killer(run_dir: Path, kills: int, killed: list, stop: threading.Event):
    """After each new checkpoint, SIGKILL one live Train worker: a worker lost mid-run, kills times."""
    seen: set[str] = set()
    while len(killed) < kills and not stop.is_set():
        now = _complete(run_dir)
        pids = [p for p in _alive_worker_pids() if p not in killed]
        if now - seen and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            seen = _complete(run_dir) | now
        time.sleep(0.2)


def _run_with_kills(cfg, kills: int):
    run_dir = Path(train.run_dir_of(cfg))
    killed, stop = [], threading.Event()
    t = threading.Thread(target=_killer, args=(run_dir, kills, killed, stop), daemon=True)
    t.start()
    try:
        return train.fit(cfg, quiet=True), killed
    finally:
        stop.set()
        t.join()


def test_as_many_worker_kills_as_max_failures_are_survived(ray_cluster, tiny):
    # Two, not more: each costs a worker-group restart (~25-30 s: fresh processes import torch again), and
    # the second proves the count goes on after a restart.
    cfg = tiny(train__num_workers=2, train__steps=400, train__log_every=25, train__ckpt_every=25,
               train__max_failures=2, run__name="kills")
    out, killed = _run_with_kills(cfg, kills=2)
    assert len(set(killed)) == 2
    assert out["step"] == 400
    state = ckpt.load(out["checkpoint"])
    assert state["step"] == 400 and state["opt_g"]["state"][0]["step"] == 400


def test_a_kill_beyond_max_failures_fails_with_a_clear_message(ray_cluster, tiny):
    cfg = tiny(train__num_workers=2, train__steps=3000, train__log_every=50, train__ckpt_every=50,
               train__max_failures=0, run__name="nokill")
    with pytest.raises(train.TrainingFailed) as e:
        _run_with_kills(cfg, kills=1)
    msg = str(e.value)
    assert "max_failures=0" in msg and "nokill" in msg and "checkpoint_" in msg and "\n" not in msg
