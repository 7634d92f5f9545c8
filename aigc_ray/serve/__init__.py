"""A Ray Serve sampling service for a trained generator: FastAPI ingress, dynamic batching, autoscaling.

    aigc-ray serve --best ~/aigc_ray/runs/fm-search/best.json          # or --checkpoint PATH, or s3://...
    serve run aigc_ray.serve:app_builder checkpoint=runs/demo            # Ray's own CLI
    serve deploy serve/config.yaml                                        # on a running cluster
    curl -s localhost:8000/sample.png?n=16\&seed=0 -o grid.png

Endpoints: POST /generate, GET /sample.png, POST /interpolate, GET /info, GET /healthz, GET / (a
playground page), GET /docs (OpenAPI). Image i of a request with seed s is drawn from z = noise(seed=s+i),
and G runs in eval mode in fixed-size chunks, so a seed gives the same image on every replica, in every
batch. Several checkpoints can be served side by side (the `models` registry, chosen per request by the
`serve_multiplexed_model_id` header); a new checkpoint in `user_config` swaps the model in place.

The parts: sampler (G_ema by seed, no Ray), api (requests, errors, the Guard middleware, encodings) and
service (the deployment and its builders).
"""

from .api import GenerateRequest, Guard, InterpolateRequest, app, token_sha256
from .sampler import Sampler, class_index, slerp
from .service import GeneratorService, ServeArgs, app_builder, build_app

__all__ = ["GenerateRequest", "GeneratorService", "Guard", "InterpolateRequest", "Sampler", "ServeArgs", "app",
           "app_builder", "build_app", "class_index", "slerp", "token_sha256"]
