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
    """After each new checkpoint, SIGKILL one live Train worker: a worker lost mid-run, kills times. killed gets
    (pid, the complete checkpoints just after the kill) per kill."""
    seen: set[str] = set()
    while len(killed) < kills and not stop.is_set():
        now = _complete(run_dir)
        pids = [p for p in _alive_worker_pids() if p not in {k for k, _ in killed}]
        if now - seen and pids:
            os.kill(pids[0], signal.SIGKILL)
            seen = _complete(run_dir) | now
            killed.append((pids[0], seen))
        time.sleep(0.2)


def _run_with_kills(cfg, kills: int, killed: list):
    run_dir = Path(train.run_dir_of(cfg))
    stop = threading.Event()
    t = threading.Thread(target=_killer, args=(run_dir, kills, killed, stop), daemon=True)
    t.start()
    try:
        return train.fit(cfg, quiet=True)
    finally:
        stop.set()
        t.join()


def test_kills_up_to_max_failures_are_survived_and_one_more_fails_with_a_clear_message(ray_cluster, tiny):
    """max_failures=1: a worker killed after the first checkpoint restarts the group from it, which goes on and
    writes the next; a worker killed again after that one ends the run (the count went on across the restart)
    in one line that names the run and where it can resume. Each restart costs ~25-30 s here (fresh processes
    import torch again)."""
    cfg = tiny(train__num_workers=2, train__steps=400, train__log_every=25, train__ckpt_every=25,
               train__max_failures=1, run__name="kills")
    killed: list = []
    with pytest.raises(train.TrainingFailed) as e:
        _run_with_kills(cfg, kills=2, killed=killed)
    assert len({pid for pid, _ in killed}) == 2
    msg = str(e.value)
    assert "max_failures=1" in msg and "kills" in msg and "checkpoint_" in msg and "\n" not in msg
    # The first kill was survived: the restarted group wrote a checkpoint beyond every one there was then,
    # with Adam's count of every G step (the second kill came after it).
    newest = max(_complete(Path(train.run_dir_of(cfg))))
    assert newest > max(killed[0][1]), (newest, killed)
    state = ckpt.load(str(Path(train.run_dir_of(cfg)) / newest))
    assert state["step"] == int(newest.split("_")[1]) and state["opt_g"]["state"][0]["step"] == state["step"]
