"""A real Ray Serve instance on a tiny checkpoint, queried over HTTP as apps and browsers would."""

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from PIL import Image

URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny):
    from aigc_ray import train

    a = train.fit(tiny(run__name="serve-a", train__steps=4), quiet=True)["checkpoint"]
    b = train.fit(tiny(run__name="serve-b", train__steps=2, train__seed=1), quiet=True)["checkpoint"]
    return a, b


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from aigc_ray.config import Config, replace

    root = tmp_path_factory.mktemp("serve-runs")

    def make(**kw):
        base = {"data.dataset": "mnist-5k", "model.ngf": 8, "model.ndf": 8, "model.latent_dim": 16,
                "train.batch_size": 16, "train.log_every": 2, "train.ckpt_every": 2, "train.num_workers": 0,
                "run.storage": str(root)}
        base.update({k.replace("__", "."): v for k, v in kw.items()})
        return replace(Config(), base)

    return make


@pytest.fixture(scope="module")
def service(ray_cluster, checkpoints):
    from ray import serve

    from aigc_ray.serve import ServeArgs, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    args = ServeArgs(checkpoint=checkpoints[0], models={"other": checkpoints[1]}, max_n=32)
    serve.run(build_app(args, num_cpus=0.5), name="aigc", route_prefix="/")
    yield args
    serve.shutdown()  # the app, the controller and the proxy: idle, they would cost the later tests CPU


@contextmanager
def _load(clients: int, body: dict):
    """Clients posting body to /generate in a loop until the block ends; yields [(time, status)]."""
    log, stop = [], threading.Event()

    def client():
        with httpx.Client(base_url=URL, timeout=60) as c:
            while not stop.is_set():
                try:
                    code = c.post("/generate", json=body).status_code
                except httpx.HTTPError:
                    code = 0
                log.append((time.time(), code))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield log
    finally:
        stop.set()
        for t in threads:
            t.join()


def _png(content):
    return Image.open(io.BytesIO(content))


def test_export_writes_the_bytes_generate_serves_for_the_same_seeds(service, tmp_path, capsys):
    import json

    from aigc_ray.cli import main

    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", service.checkpoint, "--n", "40", "--seed", "7", "--format", "png-dir",
                 "--out", str(out)]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{s:08d}.png" for s in range(7, 47)]
    with httpx.Client(base_url=URL, timeout=30) as c:
        served = c.post("/generate", json={"n": 20, "seed": 27, "format": "json"}).json()["images"]
        assert [f.read_bytes() for f in files[20:]] == [base64.b64decode(s) for s in served]
        npy = np.load(io.BytesIO(c.post("/generate", json={"n": 20, "seed": 7, "format": "npy"}).content))
    assert main(["sample", "--checkpoint", service.checkpoint, "--n", "40", "--seed", "7", "--format", "npz",
                 "--out", str(tmp_path / "s.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "npz"
    z = np.load(tmp_path / "s.npz")
    assert z["images"].shape == (40, 32, 32, 1) and z["seeds"].tolist() == list(range(7, 47))
    assert np.array_equal(z["images"][:20], npy)  # the service's max_n is 32: the first 20 of them
    # An existing output is refused, not mixed with; nothing half-written is left beside it.
    assert main(["sample", "--checkpoint", service.checkpoint, "--n", "2", "--format", "png-dir",
                 "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "samples"]


def test_each_endpoint_returns_what_it_promises(service):
    with httpx.Client(base_url=URL, timeout=30) as c:
        r = c.post("/generate", json={"n": 1, "seed": 3})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert _png(r.content).size == (32, 32)
        r = c.post("/generate", json={"n": 9, "seed": 3, "format": "grid"})
        assert _png(r.content).size == (3 * 34 + 2, 3 * 34 + 2)
        arr = np.load(io.BytesIO(c.post("/generate", json={"n": 4, "seed": 3, "format": "npy"}).content))
        assert arr.shape == (4, 32, 32, 1) and arr.dtype == np.uint8
        j = c.post("/generate", json={"n": 3, "seed": 5, "format": "json"}).json()
        assert j["seeds"] == [5, 6, 7] and len(j["images"]) == 3
        assert all(_png(base64.b64decode(s)).size == (32, 32) for s in j["images"])
        # Image i of a request is the n=1 image of seed + i.
        single = np.asarray(_png(c.post("/generate", json={"n": 1, "seed": 6}).content))
        assert np.array_equal(arr[3][:, :, 0], single)  # image 3 of seed 3 is the image of seed 6
        assert _png(c.get("/sample.png", params={"n": 16, "seed": 0}).content).size == (4 * 34 + 2,) * 2
        walk = c.post("/interpolate", json={"seed_a": 1, "seed_b": 2, "steps": 5})
        assert _png(walk.content).size == (5 * 34 + 2, 34 + 2)
        gif = c.post("/interpolate", json={"seed_a": 1, "seed_b": 2, "steps": 5, "format": "gif"})
        assert gif.headers["content-type"] == "image/gif" and Image.open(io.BytesIO(gif.content)).n_frames >= 2
        info = c.get("/info").json()
        assert info["step"] == 4 and info["checkpoint"] == service.checkpoint and info["models"] == ["default", "other"]
        assert c.get("/healthz").json()["status"] == "ok"
        assert "Generate" in c.get("/").text
        assert c.get("/docs").status_code == 200 and "/generate" in c.get("/openapi.json").text


def test_same_seed_same_bytes_even_among_concurrent_requests(service):
    body = {"n": 4, "seed": 42, "format": "npy"}
    with httpx.Client(base_url=URL, timeout=60) as c:
        alone = c.post("/generate", json=body).content

        def noise_request(i):
            return c.post("/generate", json={"n": 1 + i % 7, "seed": 1000 + i, "format": "npy"}).status_code

        with ThreadPoolExecutor(16) as pool:
            others = [pool.submit(noise_request, i) for i in range(48)]
            mine = [pool.submit(lambda: c.post("/generate", json=body).content) for _ in range(8)]
            assert all(f.result() == 200 for f in others)
            assert all(f.result() == alone for f in mine)


@pytest.mark.parametrize("kwargs,status,needle", [
    ({"json": {"n": 0, "seed": 1}}, 422, "n:"),
    ({"json": {"n": 33, "seed": 1}}, 422, "n: must be between 1 and 32"),
    ({"json": {"n": 1, "seed": "abc"}}, 422, "seed:"),
    ({"json": {"n": 1, "seed": 1.5}}, 422, "seed:"),
    ({"json": {"n": 1, "seed": 1, "format": "bmp"}}, 422, "format:"),
    ({"json": {"n": 2, "seed": 1, "format": "png"}}, 422, "use n=1"),
    ({"json": {"n": 1, "seed": 1, "class": 3}}, 422, "not class-conditional"),
    ({"json": {"n": 1, "seed": 1, "colour": "red"}}, 422, "colour"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, ""),
    ({"content": b"x" * 10000, "headers": {"content-type": "application/json"}}, 413, "over"),
    ({"json": {"n": 1, "seed": 1}, "headers": {"serve_multiplexed_model_id": "../../etc"}}, 404, "unknown model id"),
])
def test_bad_input_is_a_4xx_with_one_line(service, kwargs, status, needle):
    r = httpx.post(URL + "/generate", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err and "\n" not in err
    assert httpx.get(URL + "/healthz", timeout=30).status_code == 200  # the replica lives on


def test_a_chunked_body_without_a_length_is_refused_past_the_limit(service):
    """Transfer-Encoding: chunked carries no Content-Length: the replica stops reading at the limit (413)
    instead of buffering whatever comes (up to 64 MiB offered here, in 64 KiB chunks)."""
    import socket

    with socket.create_connection(("127.0.0.1", 8000), timeout=30) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        try:
            for _ in range(1024):
                s.sendall(chunk)
        except OSError:  # the server answered and closed: the rest was never read
            pass
        answer = b""
        while b"\r\n\r\n" not in answer:
            part = s.recv(65536)
            if not part:
                break
            answer += part
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert httpx.get(URL + "/healthz", timeout=30).status_code == 200  # the replica lives on


def test_invert_a_photo_then_generate_and_walk_from_its_latent(service):
    """POST /invert (an image upload behind the same guard) returns a latent; /generate and /interpolate take it."""
    photo = io.BytesIO()
    Image.fromarray(np.full((40, 30), 180, np.uint8)).save(photo, "PNG")
    r = httpx.post(URL + "/invert?steps=3", content=photo.getvalue(), headers={"content-type": "image/png"},
                   timeout=120)
    assert r.status_code == 200, r.text
    z = r.json()["latent"]
    assert len(z) == 16 and r.json()["steps"] == 3
    g = httpx.post(URL + "/generate", json={"n": 1, "seed": 0, "latent": z, "format": "npy"}, timeout=30)
    assert g.status_code == 200 and np.load(io.BytesIO(g.content)).shape == (1, 32, 32, 1)
    walk = httpx.post(URL + "/interpolate", json={"seed_a": 0, "seed_b": 5, "latent_a": z, "steps": 4}, timeout=30)
    assert walk.status_code == 200 and _png(walk.content).size[0] > 32
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20)).save(cmyk, "JPEG")
    for kwargs, status, needle in [
        ({"content": b"not an image"}, 422, "not an image"),
        ({"content": cmyk.getvalue()}, 422, "CMYK image with 4 channels"),
        ({"content": b"x" * (2 * 1024 * 1024 + 1)}, 413, "over"),
        ({"content": photo.getvalue(), "params": {"steps": 5000}}, 422, "steps"),
    ]:
        bad = httpx.post(URL + "/invert", timeout=60, **kwargs)
        assert bad.status_code == status and needle in bad.json()["error"], bad.text
    short = httpx.post(URL + "/generate", json={"n": 1, "seed": 0, "latent": [0.0] * 3}, timeout=30)
    assert short.status_code == 422 and "16 finite numbers" in short.json()["error"]


def test_multiplexed_models_by_header(service):
    h = {"serve_multiplexed_model_id": "other"}
    with httpx.Client(base_url=URL, timeout=30) as c:
        assert c.get("/info", headers=h).json()["step"] == 2
        a = c.post("/generate", json={"n": 1, "seed": 1}).content
        b = c.post("/generate", json={"n": 1, "seed": 1}, headers=h).content
        assert a != b


def test_playground_page_in_a_real_headless_browser(service, tmp_path):
    from playwright.sync_api import sync_playwright

    from conftest import chromium

    with sync_playwright() as p:
        browser = chromium(p)
        if browser is None:
            pytest.skip("Debian's chromium is not installed (make test installs it when run as root)")
        page = browser.new_page()
        page.goto(URL + "/")
        page.wait_for_function("document.getElementById('info').textContent.includes('step 4')")
        # A grid at once (16 images, 4x4), enlarged with crisp pixels; no class control for this model.
        page.wait_for_function("document.getElementById('grid').naturalWidth === 4 * 34 + 2", timeout=30000)
        assert page.evaluate("getComputedStyle(document.getElementById('grid')).imageRendering") == "pixelated"
        assert page.evaluate("document.getElementById('grid').clientWidth") > 2 * (4 * 34 + 2)
        assert page.is_hidden("#class-label") and page.is_visible("#download")
        page.fill("#n", "9")
        page.click("#generate")
        page.wait_for_function("document.getElementById('grid').naturalWidth === 3 * 34 + 2", timeout=30000)
        page.click("#interpolate")
        page.wait_for_function("document.getElementById('download').download.endsWith('.gif')", timeout=30000)
        page.screenshot(path=str(tmp_path / "playground.png"))
        browser.close()


def _replica_pids():
    from ray.util.state import list_actors

    return sorted(a.pid for a in list_actors(filters=[("state", "=", "ALIVE")])
                  if a.class_name.startswith("ServeReplica:aigc:GeneratorService"))


def test_fuzzed_api_from_its_own_openapi_spec_gives_no_5xx(service, tmp_path):
    """schemathesis (positive and negative cases) against /openapi.json: >= 500 requests, no 5xx, no deaths."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    before = _replica_pids()
    st = Path(sys.executable).parent / "st"
    r = subprocess.run([str(st), "run", URL + "/openapi.json", "--checks", "not_a_server_error", "--mode", "all",
                        "--max-examples", "100", "--seed", "1", "--no-color", "--request-timeout", "30"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    generated = re.search(r"(\d+) generated", r.stdout)
    assert r.returncode == 0, r.stdout[-3000:]
    assert generated and int(generated.group(1)) >= 500, r.stdout[-1500:]
    assert _replica_pids() == before  # no replica died or restarted


def test_hot_swap_changes_info_without_failed_requests(service, checkpoints):
    from ray import serve

    from aigc_ray.serve import build_app

    with _load(4, {"n": 2, "seed": 7, "format": "grid"}) as log:
        time.sleep(1)
        serve.run(build_app(service, num_cpus=0.5, user_config={"checkpoint": checkpoints[1]}),
                  name="aigc", route_prefix="/")
        deadline = time.time() + 60
        while httpx.get(URL + "/info", timeout=30).json()["step"] != 2 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1)
    statuses = [code for _, code in log]
    assert httpx.get(URL + "/info", timeout=30).json()["checkpoint"] == checkpoints[1]
    assert len(statuses) > 10 and set(statuses) == {200}


def test_a_new_winner_redeploys_as_a_ray_job_without_a_lost_request(service, checkpoints):
    """jobs/deploy.py, submitted to the running cluster as `ray job submit` does, swaps the served checkpoint
    while clients keep asking: the job ends SUCCEEDED (no PortInUse from the cluster's own proxy) and no
    request fails during the swap."""
    import os
    import sys
    from pathlib import Path

    from ray import serve
    from ray.job_submission import JobStatus, JobSubmissionClient

    from aigc_ray.serve import build_app

    deploy = Path(__file__).resolve().parents[1] / "jobs" / "deploy.py"
    client = JobSubmissionClient(os.environ["AIGC_RAY_TEST_DASHBOARD"])  # the session cluster's dashboard
    before = httpx.get(URL + "/info", timeout=30).json()["checkpoint"]
    new = checkpoints[0] if before != checkpoints[0] else checkpoints[1]
    with _load(4, {"n": 2, "seed": 7, "format": "grid"}) as log:
        deadline = time.time() + 240
        while True:  # a young cluster's job agent may not be up yet: "No available agent to submit job"
            try:
                job = client.submit_job(entrypoint=f"{sys.executable} {deploy} --checkpoint {new} --port 8000 "
                                                   "--num-cpus 0.5 --max-n 32")
                break
            except RuntimeError as e:
                assert "No available agent" in str(e) and time.time() < deadline, e
                time.sleep(2)
        while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.time() < deadline, client.get_job_logs(job)[-2000:]
            time.sleep(1)
        assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-2000:]
        while httpx.get(URL + "/info", timeout=30).json()["checkpoint"] != new and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1)
    statuses = [code for _, code in log]
    assert httpx.get(URL + "/info", timeout=30).json()["checkpoint"] == new
    assert len(statuses) > 10 and set(statuses) == {200}, sorted(set(statuses))
    serve.run(build_app(service, num_cpus=0.5), name="aigc", route_prefix="/")  # the module's service again


def test_replicas_grow_under_load(service, checkpoints):
    from ray import serve

    from aigc_ray.serve import build_app

    serve.run(build_app(service, num_cpus=0.5, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                        upscale_delay_s=1, downscale_delay_s=600, metrics_interval_s=0.5), name="aigc", route_prefix="/")

    def running():
        dep = serve.status().applications["aigc"].deployments["GeneratorService"]
        return dep.replica_states.get("RUNNING", 0)

    assert running() == 1
    with _load(12, {"n": 32, "seed": 1, "format": "npy"}) as log:
        deadline, grew = time.time() + 60, False
        while time.time() < deadline and not grew:
            grew = running() >= 2
            time.sleep(0.5)
    seen = {code for _, code in log}
    assert grew, "the replica count did not grow under load"
    assert seen == {200}


def test_serving_survives_the_loss_of_a_replica(service, checkpoints, bytes_by_replica):
    """Two replicas give the very same bytes for a seed; under load one is SIGKILLed: only requests in flight
    may fail, it is replaced, errors stop."""
    import os
    import signal

    from ray import serve

    from aigc_ray.serve import build_app

    serve.run(build_app(service, num_cpus=0.5, min_replicas=2, max_replicas=2), name="aigc", route_prefix="/")
    deadline = time.time() + 60
    while len(_replica_pids()) < 2 and time.time() < deadline:
        time.sleep(0.5)
    victims = _replica_pids()
    assert len(victims) == 2
    by_replica = bytes_by_replica(URL)
    assert len(by_replica) == 2 and len(set().union(*by_replica.values())) == 1  # both, with the same bytes
    clients = 8
    with _load(clients, {"n": 4, "seed": 1, "format": "npy"}) as log:
        time.sleep(2)
        killed_at = time.time()
        os.kill(victims[0], signal.SIGKILL)
        deadline = time.time() + 90
        while time.time() < deadline:
            pids = _replica_pids()
            if len(pids) == 2 and victims[0] not in pids:
                break
            time.sleep(0.5)
        replaced_at = time.time()
        time.sleep(2.5)
    failed = [code for ts, code in log if code != 200]
    after = [code for ts, code in log if ts > replaced_at + 1]
    print(f"replica loss: {len(log)} requests, {len(failed)} failed, replaced in {replaced_at - killed_at:.1f} s")
    assert len(_replica_pids()) == 2 and victims[0] not in _replica_pids()
    assert len(failed) <= clients  # only those in flight on the dead replica
    assert after and set(after) == {200}  # and the error rate is back to zero
