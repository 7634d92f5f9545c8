"""Training as a Ray job: the same flags as `aigc-ray train`, on the cluster it is submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --dataset fashion-mnist --num-workers 2 --steps 2000 --name fm --storage /shared/runs
"""

import sys

import ray

from aigc_ray.cli import main

if __name__ == "__main__":
    # Inside a job: connect to the cluster it was submitted to, never start one. Ray's own chatter (Train's
    # checkpoint lines, Serve's banner) with --verbose only; our lines reach the job's log through train's relay.
    ray.init(log_to_driver="--verbose" in sys.argv[1:])
    sys.exit(main(["train", *sys.argv[1:]]))
