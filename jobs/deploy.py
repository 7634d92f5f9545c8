"""Deploy a search's best.json (or a checkpoint) to Ray Serve on the cluster this job runs on.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/deploy.py --best /shared/runs/fm/best.json --port 8000
The application outlives the job; `serve status` shows it, `serve shutdown` removes it.
"""

import sys

import ray

from aigc_ray.cli import main

if __name__ == "__main__":
    ray.init()
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
