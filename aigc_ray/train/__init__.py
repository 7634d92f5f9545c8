"""Data-parallel GAN training on Ray Train: the driver (driver), the loop each worker runs (worker), and what a
run says while it trains (progress). The step itself is Ray-free: aigc_ray.gan.step.

    aigc-ray train --dataset fashion-mnist --loss wgan-gp --num-workers 2 --steps 2000 --name fm-wgan

Each of N workers holds its own shard of the data and a DDP-wrapped G and D; the global batch is
train.batch_size x N. Every train.log_every steps (at most once per REPORT_EVERY_S) the workers report
step, images seen, images/s and losses (averaged over workers); every train.ckpt_every steps rank 0 also
writes a checkpoint with a sample grid. Running the same run name again resumes from its latest checkpoint,
and a dead worker restarts the group from the last checkpoint (train.max_failures times).
"""

from .driver import TrainingFailed, check_inputs, fit, make_inputs, prepare, run_dir_of

__all__ = ["TrainingFailed", "check_inputs", "fit", "make_inputs", "prepare", "run_dir_of"]
