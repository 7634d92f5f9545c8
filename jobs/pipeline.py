"""The whole pipeline as a Ray job: search -> train the winner longer -> standard FID -> deploy -> report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --dataset fashion-mnist --storage /shared/runs --name fm --use-gpu
Flags as `aigc-ray pipeline --help`. The deployed app stays on the cluster after the job ends.
"""

import sys

import ray

from aigc_ray.cli import main

if __name__ == "__main__":
    ray.init()
    sys.exit(main(["pipeline", *sys.argv[1:]]))
