"""A small client for the aigc_ray sampling service (standard library only).

    c = Client("http://127.0.0.1:8000")         # Client(url, token=KEY) for a service that asks for a key;
                                                # Client("https://...", ca_file="cert.pem") over TLS
    png = c.grid(n=16, seed=0)                  # bytes of one PNG grid
    arrays = c.generate(n=4, seed=1, format="npy")   # uint8 (4, H, W, C)
"""

from __future__ import annotations

import http.client
import io
import json
import ssl
import urllib.error
import urllib.request
from urllib.parse import urlsplit
from typing import Any

from .config import ConfigError


RETRIES = 2  # on a connection closed before the answer came: safe, as every request here is idempotent


class ServiceError(ConfigError):
    """The service refused a request (4xx/5xx) or could not be reached; the message says which."""


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", model: str | None = None, timeout: float = 60,
                 token: str | None = None, ca_file: str | None = None):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError for a port that is no number
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # an unclosed [IPv6, a port that is no number
            ok = False
        if not ok:
            raise ConfigError(f"--url: must look like http(s)://HOST:PORT, got {url!r}")
        self.url, self.model, self.timeout, self.token = url.rstrip("/"), model, timeout, token
        self.context = None
        if self.url.startswith("https://"):  # the system's CAs, or the one given (a self-signed certificate)
            try:
                self.context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"--ca-file: cannot load {ca_file}: {getattr(e, 'strerror', None) or e}") from None
        elif ca_file:
            raise ConfigError("--ca-file: only with an https:// --url")

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[bytes, str]:
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if self.model:
            headers["serve_multiplexed_model_id"] = self.model
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        for attempt in range(RETRIES + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as r:
                    return r.read(), r.headers.get("content-type", "")
            except (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead) as e:
                # The connection closed before a whole answer came (a replica or the ingress went away
                # mid-request). Every request of this API is idempotent, so asking again is safe.
                if attempt == RETRIES:
                    raise ServiceError(f"{self.url}: the connection closed before an answer ({e})") from None
            except urllib.error.HTTPError as e:
                try:
                    reason = json.loads(e.read()).get("error", e.reason)
                except ValueError:
                    reason = e.reason
                raise ServiceError(f"{self.url}{path}: {e.code} {reason}") from None
            except (urllib.error.URLError, OSError) as e:
                if isinstance(getattr(e, "reason", None), ConnectionResetError) and attempt < RETRIES:
                    continue  # reset while sending: nothing was answered, ask again
                raise ServiceError(f"{self.url}: cannot reach the service ({getattr(e, 'reason', e)})") from None
        raise AssertionError("unreachable")

    def generate(self, n: int = 1, seed: int = 0, format: str = "png", truncation: float | None = None,
                 cls: int | None = None) -> Any:
        body: dict[str, Any] = {"n": n, "seed": seed, "format": format}
        if truncation is not None:
            body["truncation"] = truncation
        if cls is not None:
            body["class"] = cls
        content, _ = self._request("POST", "/generate", body)
        if format == "npy":
            import numpy as np  # only for npy answers: the client itself needs the standard library alone

            return np.load(io.BytesIO(content))
        if format == "json":
            return json.loads(content)
        return content

    def grid(self, n: int = 16, seed: int = 0, truncation: float | None = None, cls: int | None = None) -> bytes:
        return self.generate(n=n, seed=seed, format="grid", truncation=truncation, cls=cls)

    def interpolate(self, seed_a: int, seed_b: int, steps: int = 8, format: str = "grid") -> bytes:
        return self._request("POST", "/interpolate", {"seed_a": seed_a, "seed_b": seed_b, "steps": steps,
                                                      "format": format})[0]

    def info(self) -> dict[str, Any]:
        return json.loads(self._request("GET", "/info")[0])

    def healthy(self) -> bool:
        try:
            return json.loads(self._request("GET", "/healthz")[0]).get("status") == "ok"
        except ServiceError:
            return False
