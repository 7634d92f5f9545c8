"""The HTTP API in front of the replicas: request models, errors as one JSON line, the Guard middleware (API
key, overload, body limits) and the encodings of the answers."""


import asyncio
import base64
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
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from ray import serve

from ..images import grid, png_bytes
from .sampler import Sampler

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


PLAYGROUND = (Path(__file__).parent.parent / "playground.html").read_text()


def encode(images: np.ndarray, fmt: str, seeds: list[int], sampler: Sampler, nrow: int | None = None) -> Response:
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


def gif(images: np.ndarray) -> bytes:
    frames = [Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im) for im in images]
    frames += frames[-2:0:-1]  # there and back again
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()

