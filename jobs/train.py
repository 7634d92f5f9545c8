"""Training as a Ray job: the same flags as `aigc-ray train`, on the cluster it is submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --dataset fashion-mnist --num-workers 2 --steps 2000 --name fm --storage /shared/runs
"""

import sys

import ray

from aigc_ray.cli import main

if __name__ == "__main__":
    ray.init()  # inside a job: connect to the cluster it was submitted to, never start one
    sys.exit(main(["train", *sys.argv[1:]]))
