"""Cluster files, and the whole pipeline submitted as a Ray job to a real local cluster over HTTP."""

import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and cfg["head_node_type"] == "head_cpu"
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "none"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    from aigc_ray.serve import ServeArgs

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve/config.yaml").read_text()))
    app = schema.applications[0]
    assert app.import_path == "aigc_ray.serve:app_builder"
    ServeArgs(**app.args)  # the args are what the typed builder takes


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` on loopback (own ports, beside the test session's cluster); stopped afterwards."""
    tmp = tmp_path_factory.mktemp("cluster")
    # Its own temp dir: its address file must not become the "current cluster" that Ray's helpers
    # (the state API, the placement-group cleaner) of the test session's cluster look up.
    ray_tmp = tempfile.mkdtemp(prefix="rayc")
    # Token authentication stays on: the CLI clients send ~/.ray/auth_token (made by ray start if missing),
    # and this process's own REST calls send it as a header (_auth); nothing is turned off globally.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_DEDUP_LOGS": "1", "RAY_AUTH_MODE": "token"}
    # Its own agent ports too: the defaults (52365 for the dashboard agent) are taken by the test session's
    # cluster when it runs, and an agent without its HTTP port leaves the head refusing every job.
    agent, grpc, runtime_env, metrics = _free_ports(4)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=6390",
         "--dashboard-host=127.0.0.1", "--dashboard-port=8266", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}"], env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    address = "http://127.0.0.1:8266"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(address + "/api/version", timeout=5).status_code < 500:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        # Two Ray instances on one machine (this one and the session's, when it runs): Ray Train's
        # placement-group cleaner, an actor of the job, finds its cluster from RAY_ADDRESS or refuses to
        # guess, and then never frees the CPUs of the trials ASHA stops. The job's runtime env names it.
        current = Path(ray_tmp) / "ray_current_cluster"
        while not current.exists() and time.time() < deadline:
            time.sleep(1)
        gcs = current.read_text().strip()
        yield {"address": address, "env": env, "tmp": tmp,
               "runtime_env": json.dumps({"env_vars": {"RAY_ADDRESS": gcs}})}
    finally:  # also when setting up failed: never a cluster left running for the next tests
        head.send_signal(signal.SIGTERM)  # --block: stopping this process stops the cluster it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _submit(cluster, *args) -> str:
    # A fresh head answers HTTP before its dashboard agent registers; until then Ray refuses jobs with
    # "No available agent to submit job, please try again later": do as it says, for up to a minute.
    deadline = time.time() + 60
    while True:
        out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir",
                              str(ROOT), "--runtime-env-json", cluster["runtime_env"], "--no-wait", "--",
                              "python", "jobs/pipeline.py", *args],
                             env=cluster["env"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout + out.stderr
    return next(line.split("'")[1] for line in out.stdout.splitlines() if "submitted successfully" in line)


def _wait(cluster, job_id, timeout=600) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster["address"], headers=_auth())
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status, client.get_job_logs(job_id)
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT", client.get_job_logs(job_id)


TINY = ["--dataset", "mnist-5k", "--ngf", "8", "--ndf", "8", "--latent-dim", "16", "--batch-size", "16",
        "--eval-samples", "64", "--num-trials", "2", "--search-steps", "4", "--final-steps", "6",
        "--final-workers", "1", "--fid-samples", "20", "--ref-images", "20", "--port", "8124", "--ingress", "proxy"]


def test_bad_config_job_fails_fast_and_deploys_nothing(cluster):
    job = _submit(cluster, *TINY, "--lr-g", "-1", "--storage", str(cluster["tmp"] / "runs"), "--name", "bad")
    status, logs = _wait(cluster, job, timeout=180)
    assert str(status) in ("FAILED", "JobStatus.FAILED"), logs[-2000:]
    assert "optim.lr_g: must be > 0" in logs
    assert "Traceback" not in logs
    apps = httpx.get(cluster["address"] + "/api/serve/applications/", timeout=30,
                     headers=_auth()).json().get("applications", {})
    assert "aigc" not in apps


def _auth():
    token = Path.home() / ".ray" / "auth_token"
    return {"authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}


def test_pipeline_job_ends_with_a_served_image(cluster):
    storage = cluster["tmp"] / "runs"
    job = _submit(cluster, *TINY, "--storage", str(storage), "--name", "jobtest", "--json")
    status, logs = _wait(cluster, job)
    assert str(status) in ("SUCCEEDED", "JobStatus.SUCCEEDED"), logs[-3000:]
    # The job's stdout ends with the JSON result; Ray may append its own log lines after it.
    result = json.loads(next(line for line in reversed(logs.splitlines()) if line.startswith('{"url"')))
    assert result["url"] == "http://127.0.0.1:8124" and Path(result["report"]).exists()
    r = httpx.get("http://127.0.0.1:8124/sample.png", params={"n": 4, "seed": 0}, timeout=60)
    from PIL import Image

    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (2 * 34 + 2, 2 * 34 + 2)
    info = httpx.get("http://127.0.0.1:8124/info", timeout=30).json()
    assert info["metric"] == "fid" and info["step"] == 6
    best = json.loads((storage / "jobtest" / "best.json").read_text())
    assert best["checkpoint"] == info["checkpoint"]
