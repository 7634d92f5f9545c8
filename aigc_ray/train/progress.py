"""What a run says while it trains: a progress line per report, TensorBoard events, and the relay that brings
the lines of the Train controller and workers to the driver."""

from __future__ import annotations

import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Callable

import ray
from ray.train import UserCallback
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import storage


def progress_line(m: dict[str, Any], total: int, layout: str = "", init: dict | None = None) -> str:
    """init: the checkpoint a fine-tuned run started from (its epsilon covers the fine-tuning only)."""
    extra = f" W={m['wasserstein']:.3f}" if "wasserstein" in m else ""
    evals = "".join(f" {k}={m[k]:.2f}" for k in ("fid", "fid_domain") if k in m)
    extra += f" aug p={m['aug_p']:.2f}" if "aug_p" in m else ""
    tuned = f", fine-tuning weights trained on {init['dataset']}" if init else ""
    extra += f" eps={m['epsilon']:.2f} (delta {m['delta']:g}, this run's D steps{tuned})" if "epsilon" in m else ""
    loss_d = f"loss_d={m['loss_d']:.3f}" if "loss_d" in m else "loss_d=private"
    return (f"[aigc_ray] step {m['step']}/{total} ({100 * m['step'] / total:.0f}%) "
            f"{loss_d} loss_g={m['loss_g']:.3f}{extra}{evals} "
            f"{m['images_per_s']:.0f} img/s, {m['images_seen']} images seen" + (f", {layout}" if layout else ""))


def say(line: str) -> None:
    print(line, flush=True)


class Logger:
    """Says a progress line per report (say: print, a line relay's put, or None) and writes the same metrics
    as TensorBoard events under <run>/tensorboard.

    On an object store the events are written to a local folder and published after every flush."""

    def __init__(self, run_dir: str | None, total_steps: int, say: Callable[[str], Any] | None = None,
                 layout: str = "", init: dict | None = None):
        self.run_dir, self.total, self.say, self.layout, self.init = run_dir, total_steps, say, layout, init
        self._writer = self._local = None

    def log(self, metrics: dict[str, Any]) -> None:
        if self.say is not None:
            self.say(progress_line(metrics, self.total, self.layout, self.init))
        if not self.run_dir:
            return
        tb = storage.join(self.run_dir, "tensorboard")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # ~1 s to import: once a run logs

            self._local = tempfile.mkdtemp(prefix="aigc_tb_") if storage.is_remote(tb) else tb
            self._writer = SummaryWriter(self._local)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "step":
                self._writer.add_scalar(k, v, metrics["step"])
        self._writer.flush()
        if storage.is_remote(tb):
            storage.publish_dir(self._local, tb)


def progress_callback(run_dir: str, total: int, lines, layout: str = "", init: dict | None = None):
    class Progress(UserCallback):
        """Runs on the Ray Train controller: one line per report (into the driver's relay), and TensorBoard
        events."""

        def __init__(self):
            self.logger = Logger(run_dir, total, lines.put if lines is not None else None, layout, init)

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                self.logger.log(metrics[0])

    return Progress()


@contextmanager
def relayed_lines(enabled: bool):
    """A queue on this driver's node into which the Train controller and rank 0 put their lines, and a thread
    that prints them here. Our lines then reach the driver without Ray's log forwarding, so a command can run
    with log_to_driver=False (Ray's own chatter, Serve's start-up banner, behind --verbose) and still say
    every step. On the driver's node, the queue outlives the loss of any worker node."""
    if not enabled:
        yield None
        return
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def pump():
        while (line := queue.get()) is not None:
            print(line, flush=True)

    printer = threading.Thread(target=pump, daemon=True)
    printer.start()
    try:
        yield queue
    finally:
        queue.put(None)  # after every line the run put: all are printed before fit returns
        printer.join(timeout=60)
        queue.shutdown()

