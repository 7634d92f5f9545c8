"""Cold start: seconds from `serve deploy serve/config.yaml` to the first image over HTTP.

    python bench/cold_start.py [--checkpoint PATH]

Starts its own Ray cluster (`ray start --head --block` on loopback, ports apart from a default one),
deploys serve/config.yaml pointed at the checkpoint, polls /sample.png until an image comes back,
then stops that cluster. Token authentication stays on (the CLI sends ~/.ray/auth_token).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD, HTTP = 8267, 8125


def _get(url: str, timeout: float = 5) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except Exception:
        return None


def _answers(url: str) -> bool:
    """Any HTTP answer (401 included: token authentication is on) means the server is up."""
    try:
        urllib.request.urlopen(url, timeout=5).read()
        return True
    except urllib.error.HTTPError:
        return True
    except Exception:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint to serve [a fresh default-sized 32x32 DCGAN]")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    checkpoint = args.checkpoint
    if not checkpoint:
        sys.path.insert(0, str(ROOT / "bench"))
        from serve_load import make_checkpoint

        checkpoint = make_checkpoint(str(tmp))
    cfg = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
    cfg["http_options"]["port"] = HTTP
    app = cfg["applications"][0]
    app["args"].pop("best", None)
    app["args"]["checkpoint"] = checkpoint
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             "--port=6391", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD}",
                             "--disable-usage-stats", f"--temp-dir={tempfile.mkdtemp(prefix='rayb')}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t_cluster = time.time()
        while not _answers(f"http://127.0.0.1:{DASHBOARD}/api/version") and time.time() - t_cluster < 120:
            time.sleep(0.5)
        cluster_s = time.time() - t_cluster
        t0 = time.time()
        subprocess.run([str(BIN / "serve"), "deploy", str(tmp / "serve.yaml"), "--address",
                        f"http://127.0.0.1:{DASHBOARD}"], env=env, check=True, capture_output=True)
        deployed = time.time() - t0
        image = None
        while image is None and time.time() - t0 < 300:
            image = _get(f"http://127.0.0.1:{HTTP}/sample.png?n=16&seed=0")
            time.sleep(0.1) if image is None else None
        first = time.time() - t0
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    print(json.dumps({"cluster_start_s": round(cluster_s, 1), "serve_deploy_command_s": round(deployed, 1),
                      "deploy_to_first_image_s": round(first, 1), "image_bytes": len(image or b"")}, indent=2))


if __name__ == "__main__":
    main()
