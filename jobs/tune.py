"""A search as a Ray job: the same flags as `aigc-ray tune`, on the cluster it is submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --dataset fashion-mnist --num-trials 16 --workers-per-trial 2 --gpus-per-trial 1 \
        --storage /shared/runs --name fm-search
"""

import sys

import ray

from aigc_ray.cli import main

if __name__ == "__main__":
    ray.init()  # inside a job: connect to the cluster it was submitted to
    sys.exit(main(["tune", *sys.argv[1:]]))
