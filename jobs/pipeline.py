"""The whole pipeline as a Ray job: search -> train the winner longer -> standard FID -> deploy -> report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --dataset fashion-mnist --storage /shared/runs --name fm --use-gpu
Flags as `aigc-ray pipeline --help`. The deployed app stays on the cluster after the job ends.
"""

import sys

import ray

from aigc_ray.cli import main

if __name__ == "__main__":
    # Inside a job: connect to the cluster it was submitted to, never start one. Ray's own chatter (Train's
    # checkpoint lines, Serve's banner) with --verbose only; our lines reach the job's log through train's relay.
    ray.init(log_to_driver="--verbose" in sys.argv[1:])
    sys.exit(main(["pipeline", *sys.argv[1:]]))
