"""A Ray Serve sampling service for a trained generator: FastAPI ingress, dynamic batching, autoscaling.

    aigc-ray serve --best ~/aigc_ray/runs/fm-search/best.json          # or --checkpoint PATH, or s3://...
    serve run aigc_ray.serve:app_builder checkpoint=runs/demo            # Ray's own CLI
    serve deploy serve/config.yaml                                        # on a running cluster
    curl -s localhost:8000/sample.png?n=16\\&seed=0 -o grid.png

Endpoints: POST /generate, GET /sample.png, POST /interpolate, GET /info, GET /healthz, GET / (a
playground page), GET /docs (OpenAPI). Image i of a request with seed s is drawn from z = noise(seed=s+i),
and G runs in eval mode in fixed-size chunks, so a seed gives the same image on every replica, in every
batch. Several checkpoints can be served side by side (the `models` registry, chosen per request by the
`serve_multiplexed_model_id` header); a new checkpoint in `user_config` swaps the model in place.
"""


import asyncio
import base64
import copy
import hashlib
import hmac
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from ray import serve

from .config import ConfigError
from .images import grid, png_bytes
from .seeds import latents


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


# ----------------------------------------------------------------------------------------------------
# The sampler: plain PyTorch, no Ray.


class Sampler:
    """G_ema of one checkpoint, with what /info says about it."""

    def __init__(self, checkpoint: str | None = None, best: str | None = None, chunk: int = 16,
                 device: str | None = None):
        from .checkpoint import load_generator, read_best

        self.best = None
        if best:
            self.best = read_best(best)
            checkpoint = self.best["checkpoint"]
        if not checkpoint:
            raise ValueError("serve: give a checkpoint or a best.json")
        # On the GPU a replica was given (num_gpus), else the CPU; cuDNN made deterministic there, so two
        # replicas give the same bytes for the same seed.
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        self.g, self.cfg, self.meta = load_generator(checkpoint, self.device)  # any storage: s3://..., a folder
        self.path, self.chunk = self.meta["path"], chunk
        self.version = f"step{self.meta['step']}-{self.meta['sha1'][:10]}"

    def noise(self, seeds: list[int], truncation: float | None) -> torch.Tensor:
        return latents(seeds, self.cfg.model.latent_dim, truncation).to(self.device)  # seeds.py's rule

    @torch.no_grad()
    def forward(self, z: torch.Tensor, labels: list[int] | None = None) -> np.ndarray:
        """uint8 (N, H, W, C) from G_ema in padded chunks of a fixed size, so no image depends on its batch."""
        y = None
        if self.cfg.model.conditional:
            y = (torch.tensor(labels) if labels else torch.zeros(len(z), dtype=torch.long)).to(self.device)
        parts = []
        for i in range(0, len(z), self.chunk):
            zc, yc = z[i:i + self.chunk], None if y is None else y[i:i + self.chunk]
            pad = self.chunk - len(zc)
            if pad:
                zc = torch.cat([zc, zc.new_zeros(pad, zc.shape[1])])
                yc = None if yc is None else torch.cat([yc, yc.new_zeros(pad)])
            parts.append(self.g(zc, yc)[: self.chunk - pad])
        x = torch.cat(parts)
        return x.add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def info(self) -> dict[str, Any]:
        out = {"checkpoint": self.path, "step": self.meta["step"], "version": self.version,
               "config": self.cfg.to_dict(), "conditional": self.cfg.model.conditional,
               "num_classes": self.cfg.model.num_classes, "class_names": list(self.cfg.model.class_names),
               "image_size": self.cfg.data.image_size}
        # epsilon and delta of a DP run and what they cover (with a search's cost, from best.json); None: no DP
        out["privacy"] = (self.best or {}).get("privacy") or self.meta.get("privacy")
        if self.best:
            out.update(metric=self.best.get("metric"), value=self.best.get("value"), trial_id=self.best.get("trial_id"))
            out["audit"] = self.best.get("audit")  # the memorization audit's copy rate, when the pipeline ran it
        return out


def _latent(values: list[float], sampler: Sampler, field: str) -> torch.Tensor:
    z = torch.tensor(values, dtype=torch.float32)
    if z.numel() != sampler.cfg.model.latent_dim or not torch.isfinite(z).all():
        raise BadRequest(422, f"{field}: must be {sampler.cfg.model.latent_dim} finite numbers (this model's "
                              f"latent_dim), got {z.numel()}")
    return z.to(sampler.device)


def class_index(cfg, cls: int | str, flag: str = "--class") -> int:
    """A class given by index or by name (a person's folder name, s7, t-shirt/top) as its index; an unknown
    name is refused in one line naming the nearest known ones."""
    import difflib

    m = cfg.model
    if not m.conditional:
        raise ConfigError(f"{flag}: this model is not class-conditional")
    names = list(m.class_names)
    if isinstance(cls, str) and cls in names:
        return names.index(cls)
    if isinstance(cls, int) or (isinstance(cls, str) and cls.lstrip("-").isdigit()):
        i = int(cls)
        if not 0 <= i < m.num_classes:
            raise ConfigError(f"{flag}: must be in [0, {m.num_classes}) or a name, got {cls}")
        return i
    near = difflib.get_close_matches(str(cls), names, n=3, cutoff=0.0) if names else []
    known = f"; nearest: {', '.join(near)}" if near else " (this model's classes have no names: use an index)"
    raise ConfigError(f"{flag}: unknown class {cls!r}{known}")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: stays on the shell where Gaussian noise lives."""
    omega = torch.arccos(torch.clamp((a / a.norm()) @ (b / b.norm()), -1, 1))
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


# ----------------------------------------------------------------------------------------------------
# Requests.

Seed = Field(ge=0, le=2**62, description="noise seed: image i uses seed + i")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    n: StrictInt = Field(1, ge=1, description="images to generate (1..max_n)")
    seed: StrictInt = Seed
    format: Literal["png", "grid", "npy", "json"] = "png"
    truncation: Optional[float] = Field(None, gt=0, le=10, description="redraw |z| above this")
    class_: Optional[Union[StrictInt, str]] = Field(None, alias="class", description=(
        "class of a conditional model: its index, or its name (a person's folder name)"))
    latent: Optional[list[float]] = Field(None, max_length=4096, description=(
        "a latent z instead of the seed's (from POST /invert): latent_dim numbers; n must be 1"))


class InterpolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    seed_a: StrictInt = Seed
    seed_b: StrictInt = Seed
    latent_a: Optional[list[float]] = Field(None, max_length=4096, description="a latent instead of seed_a's")
    latent_b: Optional[list[float]] = Field(None, max_length=4096, description="a latent instead of seed_b's")
    class_: Optional[Union[StrictInt, str]] = Field(None, alias="class", description="class of a conditional model")
    steps: StrictInt = Field(8, ge=2, le=64)
    format: Literal["grid", "gif"] = "grid"


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        self.status, self.reason = status, reason


app = FastAPI(title="aigc_ray generator", description="Samples from a GAN trained with aigc_ray.")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    e = exc.errors()[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
    return JSONResponse({"error": f"{where or 'body'}: {e.get('msg', 'invalid')}"}, status_code=422)


@app.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest):
    return JSONResponse({"error": exc.reason}, status_code=exc.status)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Guard:
    """Pure ASGI middleware in front of the API, the cheap checks first (a Starlette http middleware
    cost 2.5x the requests/s here):
    1. the API key, when the service has one: `Authorization: Bearer <key>`, else 401 (/ and /healthz are open);
    2. overload: past max_ongoing_requests + max_queued_requests in this replica, 503 at once with Retry-After,
       so a burst is refused, never queued without bound;
    3. bodies over max_body_bytes: 413, from the Content-Length header, or while reading a body that has none
       (Transfer-Encoding: chunked), never reading past the limit.
    Test-only: with AIGC_RAY_TEST_FAULTS=1 in the replica's environment, a request carrying the header
    `x-aigc-ray-fault: crash` ends the replica's process (to test retries) and `slow` holds its place for 2 s
    (to test overload); otherwise the header is ignored.
    """

    OPEN = {"/", "/healthz"}
    settings: dict[str, Any] = {"max_body_bytes": 4096, "token_sha256": None, "max_inflight": None}
    inflight = 0  # requests inside this replica's app now

    def __init__(self, app):
        self.app = app
        self.faults = os.environ.get("AIGC_RAY_TEST_FAULTS") == "1"

    @staticmethod
    async def _refuse(send, status: int, reason: str, headers: tuple = ()) -> None:
        body = json.dumps({"error": reason}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _bounded_body(receive, limit: int) -> bytes | None:
        """The request body, or None as soon as it passes limit bytes (the rest is never read)."""
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return b"".join(parts)
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    @staticmethod
    def _replay(body: bytes):
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        return receive

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, headers = Guard.settings, dict(scope.get("headers", ()))
        if cfg["token_sha256"] and scope["path"] not in Guard.OPEN:
            given = headers.get(b"authorization", b"").decode("latin-1")
            key = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token_sha256(key), cfg["token_sha256"]):
                return await self._refuse(send, 401, "missing or wrong API key: send Authorization: Bearer <key>",
                                          ((b"www-authenticate", b"Bearer"),))
        if cfg["max_inflight"] is not None and Guard.inflight >= cfg["max_inflight"]:
            return await self._refuse(send, 503, f"overloaded: {Guard.inflight} requests in progress on this "
                                                 "replica; retry shortly", ((b"retry-after", b"1"),))
        limit = cfg.get("max_upload_bytes", 2 << 20) if scope["path"] == "/invert" else cfg["max_body_bytes"]
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(send, 413, f"request body over {limit} bytes")
        if scope.get("method") in ("POST", "PUT", "PATCH"):  # read the body here, never more than the limit:
            body = await self._bounded_body(receive, limit)  # a chunked body has no length
            if body is None:
                return await self._refuse(send, 413, f"request body over {limit} bytes")
            receive = self._replay(body)
        fault = headers.get(b"x-aigc-ray-fault") if self.faults else None
        if fault == b"crash":
            os._exit(1)
        Guard.inflight += 1
        try:
            if fault == b"slow":  # holds its place for 2 s, as a slow model would
                await asyncio.sleep(2)
            await self.app(scope, receive, send)
        finally:
            Guard.inflight -= 1


app.add_middleware(Guard)


PLAYGROUND = (Path(__file__).parent / "playground.html").read_text()


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


def _encode(images: np.ndarray, fmt: str, seeds: list[int], sampler: Sampler, nrow: int | None = None) -> Response:
    # x-replica names the replica that made the images (two replicas must give the same bytes for a seed).
    headers = {"x-model-version": sampler.version, "x-replica": serve.get_replica_context().replica_id.unique_id}
    if fmt == "png":
        return Response(png_bytes(images[0]), media_type="image/png", headers=headers)
    if fmt == "grid":
        t = torch.from_numpy(images).permute(0, 3, 1, 2)
        return Response(png_bytes(grid(t, nrow=nrow or max(1, math.ceil(math.sqrt(len(images)))))),
                        media_type="image/png", headers=headers)
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, images)
        return Response(buf.getvalue(), media_type="application/x-npy", headers=headers)
    return JSONResponse({"seeds": seeds, "version": sampler.version,
                         "images": [base64.b64encode(png_bytes(im)).decode() for im in images]}, headers=headers)


def _gif(images: np.ndarray) -> bytes:
    from PIL import Image

    frames = [Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im) for im in images]
    frames += frames[-2:0:-1]  # there and back again
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()


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
            return _encode(images, req.format, [], sampler)
        seeds = list(range(req.seed, req.seed + req.n))
        images = await self._images(sampler, seeds, req.truncation, labels)
        return _encode(images, req.format, seeds, sampler)

    @app.get("/sample.png", summary="A grid of n images, for quick looks and <img> tags")
    async def sample(self, n: int = Query(16, ge=1), seed: int = Query(0, ge=0, le=2**62),
                     truncation: Optional[float] = Query(None, gt=0, le=10),
                     class_: Optional[str] = Query(None, alias="class", description="index or name")):
        sampler = await self._sampler()
        labels = self._check(sampler, n, class_)
        images = await self._images(sampler, list(range(seed, seed + n)), truncation, labels)
        return _encode(images, "grid", [], sampler)

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
            return Response(_gif(x), media_type="image/gif")
        return _encode(x, "grid", [], sampler, nrow=req.steps)

    @app.post("/invert", summary="The latent of your photo: upload an image (the body), get z for /generate")
    async def invert(self, request: Request, class_: Optional[str] = Query(None, alias="class"),
                     steps: int = Query(50, ge=1, le=1000)):
        from .invert import feature_fn, invert, photo_tensor

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
