"""The deployment: GeneratorService (batching, multiplexed models, hot swap, the endpoints) and its builders."""


import asyncio
import copy
from typing import Any, Optional

import numpy as np
import torch
from fastapi import Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ..config import ConfigError
from ..invert import feature_fn, invert, photo_tensor
from ..seeds import latents
from .api import PLAYGROUND, BadRequest, GenerateRequest, Guard, InterpolateRequest, app, encode, gif
from .sampler import Sampler, class_index, slerp


class ServeArgs(BaseModel):
    """Arguments of the app builder (`serve run ... key=value`, `args:` in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: Optional[str] = Field(None, description="checkpoint folder, or run folder (its latest)")
    best: Optional[str] = Field(None, description="best.json of a search (its checkpoint and metric)")
    models: dict[str, str] = Field({}, description="extra model ids -> checkpoints, chosen per request by header")
    max_n: int = Field(64, ge=1, le=1024, description="most images one request may ask for")
    max_batch_size: int = Field(32, ge=1, description="requests merged into one forward pass")
    batch_wait_timeout_s: float = Field(0.003, ge=0, description="how long a batch waits to fill")
    batching: bool = Field(True, description="merge concurrent requests (off: one forward per request)")
    chunk: int = Field(16, ge=1, description="G's fixed forward batch: results never depend on batch mates")
    max_body_bytes: int = Field(4096, ge=256, description="larger request bodies are refused (413)")
    max_upload_bytes: int = Field(2 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024,
                                  description="POST /invert: larger photos are refused (413)")
    invert_steps: int = Field(100, ge=1, le=1000, description="POST /invert: the most optimisation steps allowed")
    token_sha256: Optional[str] = Field(None, pattern="^[0-9a-f]{64}$", description=(
        "sha256 (hex) of the API key; set: every endpoint but / and /healthz needs Authorization: Bearer <key>"))
    threads: int = Field(0, ge=0, description="torch threads per replica; 0: its CPUs")


def _latent(values: list[float], sampler: Sampler, field: str) -> torch.Tensor:
    z = torch.tensor(values, dtype=torch.float32)
    if z.numel() != sampler.cfg.model.latent_dim or not torch.isfinite(z).all():
        raise BadRequest(422, f"{field}: must be {sampler.cfg.model.latent_dim} finite numbers (this model's "
                              f"latent_dim), got {z.numel()}")
    return z.to(sampler.device)


def _run_items(items: list[tuple]) -> list[np.ndarray]:
    """One forward per model over every request in the batch; the results split back per request."""
    out: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
    by_model: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_model.setdefault(id(item[0]), []).append(i)
    for idxs in by_model.values():
        sampler = items[idxs[0]][0]
        zs, labels = [], []
        for i in idxs:
            _, seeds, truncation, lab = items[i]
            zs.append(sampler.noise(seeds, truncation))
            labels += lab or []
        images = sampler.forward(torch.cat(zs), labels or None)
        start = 0
        for i, z in zip(idxs, zs):
            out[i], start = images[start:start + len(z)], start + len(z)
    return out


def _max_inflight() -> int | None:
    """max_ongoing_requests + max_queued_requests of this replica's deployment (None: unbounded)."""
    try:
        dc = serve.get_replica_context()._deployment_config  # Serve's own numbers: one source of truth
    except Exception:  # not in a replica (a unit test of the app)
        return None
    return None if dc.max_queued_requests < 0 else dc.max_ongoing_requests + dc.max_queued_requests



# serve.ingress serializes the class when it is defined: every helper it calls must exist above it.
@serve.deployment(max_ongoing_requests=128, max_queued_requests=512, ray_actor_options={"num_cpus": 1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 1})
@serve.ingress(app)
class GeneratorService:
    def __init__(self, args: dict[str, Any]):
        self.args = ServeArgs(**args)
        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        Guard.settings = {"max_body_bytes": self.args.max_body_bytes, "token_sha256": self.args.token_sha256,
                          "max_upload_bytes": self.args.max_upload_bytes,
                          "max_inflight": _max_inflight()}
        self.default = Sampler(self.args.checkpoint, self.args.best, self.args.chunk)
        self._batched.set_max_batch_size(self.args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot swap: a new checkpoint (or best.json) in user_config replaces the default model in place."""
        if user_config and (user_config.get("checkpoint") or user_config.get("best")):
            new = Sampler(user_config.get("checkpoint"), user_config.get("best"), self.args.chunk)
            self.default = new  # one assignment: a request sees the old model or the new one, never half

    @serve.multiplexed(max_num_models_per_replica=4)
    async def _model(self, model_id: str) -> Sampler:
        return Sampler(self.args.models[model_id], chunk=self.args.chunk)

    async def _sampler(self) -> Sampler:
        model_id = serve.get_multiplexed_model_id()
        if not model_id or model_id == "default":
            return self.default
        if model_id not in self.args.models:
            raise BadRequest(404, f"unknown model id {model_id!r}; registered: default, "
                                  f"{', '.join(sorted(self.args.models)) or '(none)'}")
        return await self._model(model_id)

    # Batching: concurrent requests of one model run as one forward pass.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
    async def _batched(self, items: list[tuple]) -> list[np.ndarray]:
        return _run_items(items)  # CPU-bound on this replica's own core: no thread hop

    async def _images(self, sampler: Sampler, seeds: list[int], truncation, labels) -> np.ndarray:
        item = (sampler, seeds, truncation, labels)
        if self.args.batching:
            return await self._batched(item)
        return _run_items([item])[0]

    def _check(self, sampler: Sampler, n: int, cls: int | str | None) -> list[int] | None:
        if n > self.args.max_n:
            raise BadRequest(422, f"n: must be between 1 and {self.args.max_n}, got {n}")
        m = sampler.cfg.model
        if cls is None:
            return [0] * n if m.conditional else None
        try:
            return [class_index(sampler.cfg, cls, "class")] * n
        except ConfigError as e:
            raise BadRequest(422, str(e)) from None

    @app.post("/generate", summary="Generate n images from a seed")
    async def generate(self, req: GenerateRequest):
        sampler = await self._sampler()
        labels = self._check(sampler, req.n, req.class_)
        if req.format == "png" and req.n != 1:
            raise BadRequest(422, "format: png returns one image; use n=1, or format grid")
        if req.latent is not None:  # your own latent (POST /invert), not a seed's
            if req.n != 1:
                raise BadRequest(422, "latent: gives one image; use n=1")
            z = _latent(req.latent, sampler, "latent").unsqueeze(0)
            images = await asyncio.get_running_loop().run_in_executor(None, sampler.forward, z, labels)
            return encode(images, req.format, [], sampler)
        seeds = list(range(req.seed, req.seed + req.n))
        images = await self._images(sampler, seeds, req.truncation, labels)
        return encode(images, req.format, seeds, sampler)

    @app.get("/sample.png", summary="A grid of n images, for quick looks and <img> tags")
    async def sample(self, n: int = Query(16, ge=1), seed: int = Query(0, ge=0, le=2**62),
                     truncation: Optional[float] = Query(None, gt=0, le=10),
                     class_: Optional[str] = Query(None, alias="class", description="index or name")):
        sampler = await self._sampler()
        labels = self._check(sampler, n, class_)
        images = await self._images(sampler, list(range(seed, seed + n)), truncation, labels)
        return encode(images, "grid", [], sampler)

    @app.post("/interpolate", summary="A walk through latent space from seed_a to seed_b")
    async def interpolate(self, req: InterpolateRequest):
        sampler = await self._sampler()
        m = sampler.cfg.model
        a, b = latents([req.seed_a, req.seed_b], m.latent_dim)
        if req.latent_a is not None:  # walk from your own photo's latent (POST /invert) to any seed
            a = _latent(req.latent_a, sampler, "latent_a")
        if req.latent_b is not None:
            b = _latent(req.latent_b, sampler, "latent_b")
        labels = (self._check(sampler, 1, req.class_) or [None])[0]
        z = torch.stack([slerp(a, b, t) for t in np.linspace(0, 1, req.steps)]).to(sampler.device)
        x = await asyncio.get_running_loop().run_in_executor(
            None, sampler.forward, z, None if labels is None else [labels] * req.steps)
        if req.format == "gif":
            return Response(gif(x), media_type="image/gif")
        return encode(x, "grid", [], sampler, nrow=req.steps)

    @app.post("/invert", summary="The latent of your photo: upload an image (the body), get z for /generate")
    async def invert(self, request: Request, class_: Optional[str] = Query(None, alias="class"),
                     steps: int = Query(50, ge=1, le=1000)):
        sampler = await self._sampler()
        if steps > self.args.invert_steps:
            raise BadRequest(422, f"steps: at most {self.args.invert_steps} on this service, got {steps}")
        label = (self._check(sampler, 1, class_) or [None])[0] if class_ is not None or \
            sampler.cfg.model.conditional else None
        if sampler.cfg.model.conditional and class_ is None:
            raise BadRequest(422, "class: this model is conditional: say whose double (?class=NAME)")
        try:
            photo = photo_tensor(await request.body(), sampler.cfg, "body")
        except ConfigError as e:
            raise BadRequest(422, str(e)) from None
        g = sampler.g if sampler.device.type == "cpu" else copy.deepcopy(sampler.g).cpu()
        inv = await asyncio.get_running_loop().run_in_executor(  # the domain classifier only if already cached
            None, lambda: invert(g, sampler.cfg, photo, label=label, steps=steps,
                                 features=feature_fn(sampler.cfg, train_domain=False)))
        return {"latent": inv.z.tolist(), "class": inv.label, "steps": steps, "pixel_error": inv.pixel_error,
                "seconds": inv.seconds, "latent_dim": sampler.cfg.model.latent_dim}

    @app.get("/info", summary="What is served: checkpoint, step, config, metric, version")
    async def info(self):
        sampler = await self._sampler()
        return {**sampler.info(), "models": ["default", *sorted(self.args.models)], "max_n": self.args.max_n}

    @app.get("/healthz", summary="Liveness, and whether requests need an API key")
    async def healthz(self):
        return {"status": "ok", "version": self.default.version, "auth": bool(self.args.token_sha256)}

    @app.get("/", response_class=HTMLResponse, summary="Playground page")
    async def playground(self):
        return HTMLResponse(PLAYGROUND)


def app_builder(args: ServeArgs) -> serve.Application:
    """The typed app builder behind `serve run` and `serve deploy serve/config.yaml`."""
    if not args.checkpoint and not args.best:
        raise ValueError("serve: give checkpoint=PATH or best=PATH/best.json")
    Sampler(args.checkpoint, args.best)  # fail here, with the path in the message, not in a replica
    for model_id, path in args.models.items():
        Sampler(path)
    return GeneratorService.bind(args.model_dump())


def build_app(args: ServeArgs, *, min_replicas: int = 1, max_replicas: int = 1, target_ongoing_requests: float = 16,
              upscale_delay_s: float = 10, downscale_delay_s: float = 120, metrics_interval_s: float = 2,
              num_cpus: float = 1, num_gpus: float = 0, max_ongoing_requests: int = 128,
              max_queued_requests: int = 512, user_config: dict | None = None) -> serve.Application:
    """app_builder with the deployment's autoscaling and resources set from Python (the CLI, tests)."""
    if not args.checkpoint and not args.best:
        raise ValueError("serve: give checkpoint=PATH or best=PATH/best.json")
    Sampler(args.checkpoint, args.best)
    return GeneratorService.options(
        max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests, user_config=user_config,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "initial_replicas": min_replicas, "target_ongoing_requests": target_ongoing_requests,
                            "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s,
                            "metrics_interval_s": metrics_interval_s, "look_back_period_s": max(2 * metrics_interval_s, 2)},
    ).bind(args.model_dump())

