"""Serving load: samples/s, p50/p99 latency and errors under C concurrent clients, for n=1 and n=16.

    python bench/serve_load.py --seconds 10 --connections 32

Measured in one run, on loopback only, each server in its own Ray instance:
  minimal      a minimal batched Serve deployment of the same generator (the baseline)
  unbatched    aigc_ray's service, one forward per request
  batched      aigc_ray's service, @serve.batch merging concurrent requests
  direct       the batched service with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray 2.60: direct ingress: the
               replica serves HTTP itself on port 30000, no proxy hop; user code on the replica's loop)
  haproxy-ray  the same behind Ray 2.60's HAProxy ingress as Ray configures it (RAY_SERVE_ENABLE_HA_PROXY=1)
               on port 8000, which balances over every replica's direct port
  haproxy      aigc-ray serve's default: that ingress kept on loopback, retrying a request whose replica
               died (ingress.haproxy_env)
  haproxy-key  the same with an API key: every request carries Authorization: Bearer <key>
and the limit: the generator's in-process forward + PNG encoding at the same batch size.
The load generator is wrk (Debian's package) with a Lua script drawing a random seed per request.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve()
PORT = 8000
DIRECT_PORT = 30000
OPTIMIZED = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_PORT)}
KEY = "bench-key-0123456789abcdef"
KINDS = {  # name: (environment of its Ray instance, port the clients use)
    "minimal": ({}, PORT), "unbatched": ({}, PORT), "batched": ({}, PORT),
    "direct": (OPTIMIZED, DIRECT_PORT), "haproxy-ray": ({**OPTIMIZED, "RAY_SERVE_ENABLE_HA_PROXY": "1"}, PORT),
    "haproxy": ("ours", PORT), "haproxy-key": ("ours", PORT),
}

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if KEY ~= "" then wrk.headers["Authorization"] = "Bearer " .. KEY end
request = function()
  return wrk.format(nil, nil, nil, string.format('{"n": %d, "seed": %d, "format": "%s"}', N, math.random(0, 1000000), FMT))
end
"""


def make_checkpoint(root: str) -> str:
    """A default-sized 32x32 DCGAN (ngf=ndf=64, z=128) after a few steps: the speed is what matters here."""
    from aigc_ray import train
    from aigc_ray.config import Config, replace

    cfg = replace(Config(), {"data.dataset": "mnist-5k", "train.steps": 2, "train.ckpt_every": 2,
                             "train.num_workers": 0, "run.name": "bench", "run.storage": root})
    return train.fit(cfg, quiet=True)["checkpoint"]


# ----------------------------------------------------------------------------------------------------
# Servers (each runs in a child process with its own Ray instance).


def _minimal_app(checkpoint: str):
    import torch
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    from aigc_ray.checkpoint import load_generator
    from aigc_ray.images import grid, png_bytes
    from aigc_ray.seeds import noise

    @serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 1})
    class Minimal:
        def __init__(self, path):
            self.g, self.cfg, _ = load_generator(path)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
        async def gen(self, reqs: list) -> list:
            with torch.no_grad():
                z = torch.cat([noise(r["n"], self.cfg.model.latent_dim, seed=r["seed"]) for r in reqs])
                x = self.g(z).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            out, i = [], 0
            for r in reqs:
                part, i = x[i:i + r["n"]], i + r["n"]
                out.append(png_bytes(part[0].permute(1, 2, 0).numpy()) if r["n"] == 1 else png_bytes(grid(part)))
            return out

        async def __call__(self, request: Request):
            return Response(await self.gen(await request.json()), media_type="image/png")

    return Minimal.bind(checkpoint)


def serve_forever(kind: str, checkpoint: str, replicas: int) -> None:
    import ray
    from ray import serve

    from aigc_ray.serve import ServeArgs, build_app

    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT}, logging_config={"log_level": "WARNING"})
    if kind == "minimal":
        app = _minimal_app(checkpoint)
    else:
        from aigc_ray.serve import token_sha256

        app = build_app(ServeArgs(checkpoint=checkpoint, batching=kind != "unbatched", max_batch_size=32,
                                  token_sha256=token_sha256(KEY) if kind == "haproxy-key" else None), num_cpus=1,
                        min_replicas=replicas, max_replicas=replicas)
    serve.run(app, name="bench", route_prefix="/")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # so sigwait, not death, gets them
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    serve.shutdown()
    ray.shutdown()  # stops the Ray instance this child started: no cluster outlives its measurement


def _env(kind: str) -> dict[str, str]:
    if KINDS[kind][0] == "ours":
        from aigc_ray import ingress

        return ingress.haproxy_env(PORT)
    return KINDS[kind][0]


def start_server(kind: str, checkpoint: str, replicas: int = 1) -> subprocess.Popen:
    env = {**os.environ, **_env(kind)}
    proc = subprocess.Popen([sys.executable, str(HERE), "--_server", kind, "--checkpoint", checkpoint,
                             "--replicas", str(replicas)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    for line in proc.stdout:
        if "READY" in line or time.time() > deadline:
            break
    body = json.dumps({"n": 1, "seed": 0, "format": "png"}).encode()
    for _ in range(120):  # the route may take a moment to reach the proxy
        try:
            headers = {"content-type": "application/json"}
            if kind == "haproxy-key":
                headers["authorization"] = f"Bearer {KEY}"
            req = urllib.request.Request(f"http://127.0.0.1:{KINDS[kind][1]}/" + ("" if kind == "minimal" else "generate"),
                                         data=body, headers=headers)
            urllib.request.urlopen(req, timeout=10).read()
            return proc
        except Exception:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"{kind}: server did not answer")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(3)  # let the Ray processes of that instance exit before the next measurement


# ----------------------------------------------------------------------------------------------------
# Load and the in-process limit.


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(port: int, path: str, n: int, fmt: str, seconds: int, connections: int, key: str = "") -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f"N = {n}\nFMT = \"{fmt}\"\nKEY = \"{key}\"\n" + LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "30s",
                          "-s", f.name, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
    os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    if not re.search(r"50%\s+\d", out):  # nothing came back
        return {"requests_per_s": 0.0, "images_per_s": 0.0, "errors": -1, "wrk": out.strip().splitlines()[-3:]}
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"requests_per_s": round(rps, 1), "images_per_s": round(rps * n, 1), "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1), "errors": errors}


def in_process(checkpoint: str, n: int, batch_images: int, seconds: float = 5.0) -> float:
    """Images/s of forward + PNG encoding in this process: batch_images per forward, PNGs of n images each."""
    import torch

    from aigc_ray.images import grid, png_bytes
    from aigc_ray.serve import Sampler

    torch.set_num_threads(1)  # as a 1-CPU replica has
    s = Sampler(checkpoint, chunk=16)
    seeds = list(range(batch_images))
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images = s.forward(s.noise(seeds, None))
        for i in range(0, batch_images, n):
            part = images[i:i + n]
            png_bytes(part[0]) if n == 1 else png_bytes(grid(torch.from_numpy(part).permute(0, 3, 1, 2)))
        done += batch_images
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--checkpoint", help="checkpoint to serve [a fresh default-sized 32x32 DCGAN]")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--replicas", default="1", help="replicas of aigc_ray's service, e.g. 1,2 for one line each [1]")
    p.add_argument("--_server", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._server:
        return serve_forever(args._server, args.checkpoint, int(args.replicas))
    if not shutil.which("wrk"):
        sys.exit("serve_load: needs wrk (apt-get install wrk)")
    tmp = tempfile.mkdtemp()
    checkpoint = args.checkpoint or make_checkpoint(tmp)
    results: dict = {"connections": args.connections, "seconds": args.seconds, "machine_cpus": os.cpu_count()}
    for kind in args.kinds.split(","):
        for replicas in map(int, args.replicas.split(",")):
            name = kind if replicas == 1 else f"{kind} x{replicas} replicas"
            proc = start_server(kind, checkpoint, replicas)
            try:
                path, port = "/" if kind == "minimal" else "/generate", KINDS[kind][1]
                key = KEY if kind == "haproxy-key" else ""
                wrk(port, path, 1, "png", 2, args.connections, key)  # warm-up
                results[name] = {"n=1": wrk(port, path, 1, "png", args.seconds, args.connections, key),
                                 "n=16": wrk(port, path, 16, "grid", args.seconds, args.connections, key)}
            finally:
                stop_server(proc)
            print(name, json.dumps(results[name]), flush=True)
    results["in_process_images_per_s"] = {"n=1 (32 per forward)": round(in_process(checkpoint, 1, 32), 1),
                                          "n=16 (16 per forward)": round(in_process(checkpoint, 16, 16), 1)}
    if "minimal" in results:
        base = results["minimal"]["n=1"]["requests_per_s"]
        limit16 = results["in_process_images_per_s"]["n=16 (16 per forward)"]
        results["ratios"] = {f"{k} n=1 vs minimal": round(results[k]["n=1"]["requests_per_s"] / base, 2)
                             for k in KINDS if k in results and k != "minimal"}
        results["ratios"].update({f"{k} n=16 vs in-process": round(results[k]["n=16"]["images_per_s"] / limit16, 2)
                                  for k in KINDS if k in results and k != "minimal"})
    print(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
