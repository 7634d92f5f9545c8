"""`aigc-ray serve` as a user runs it: its own local cluster and the default (HAProxy) ingress, in a subprocess.

Nothing of ours listens beyond loopback and no control socket is open to other users; a replica killed
under load loses no request; a request that kills every replica fails once; overload is refused at
once; a hard kill leaves nothing behind; an exposed service asks for a key.
"""

import ipaddress
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from aigc_ray.testing import free_ports

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
RAY_PROCESSES = ("gcs_server", "raylet", "ray::", "default_worker.py", "dashboard/dashboard.py", "dashboard/agent.py",
                 "runtime_env/agent/main.py", "autoscaler/_private/monitor.py", "log_monitor.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from aigc_ray import train
    from aigc_ray.config import Config, replace

    cfg = replace(Config(), {"data.dataset": "mnist-5k", "model.ngf": 8, "model.ndf": 8, "model.latent_dim": 16,
                             "train.batch_size": 16, "train.steps": 2, "train.ckpt_every": 2, "train.num_workers": 0,
                             "run.name": "trust", "run.storage": str(tmp_path_factory.mktemp("trust-runs"))})
    return train.fit(cfg, quiet=True)["checkpoint"]


class Served:
    def __init__(self, checkpoint: str, log: Path, *args, host: str = "127.0.0.1", env: dict | None = None,
                 port: int | None = None, url: str = "http://127.0.0.1", verify=True, key: str | None = None):
        self.port = port or free_ports(1)[0]
        self.url, self.verify = f"{url}:{self.port}", verify  # requests go to loopback, whatever --host binds
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.log = log
        self.proc = subprocess.Popen([str(BIN / "aigc-ray"), "serve", "--checkpoint", checkpoint, "--host", host,
                                      "--port", str(self.port), *args], env={**os.environ, **(env or {})},
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_up(self, timeout: float = 180) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=5, verify=self.verify).status_code == 200:
                    return time.time() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.log.read_text()[-3000:])

    def replica_pids(self) -> list[int]:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return sorted(p.pid for p in procs if _cmd(p).startswith("ray::ServeReplica:aigc:GeneratorService"))

    def wait_replicas(self, n: int, timeout: float = 120, besides: tuple = ()) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = self.replica_pids()
            if len(pids) == n and not set(pids) & set(besides):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{n} replicas not running; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: serve.shutdown, then the cluster goes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """2 replicas, a small queue (16 working + 8 waiting per replica), test-only fault injection on."""
    s = Served(checkpoint, tmp_path_factory.mktemp("served") / "serve.log", "--min-replicas", "2",
               "--max-replicas", "2", "--num-cpus", "0.5", "--max-ongoing-requests", "16",
               "--max-queued-requests", "8", env={"AIGC_RAY_TEST_FAULTS": "1"})
    try:
        s.wait_up()
        s.wait_replicas(2)
        deadline = time.time() + 60  # and the ingress routes to them
        while httpx.post(s.url + "/generate", json={"n": 1, "seed": 0}, timeout=30).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.5)
        yield s
    finally:
        s.stop()


def test_nothing_of_ours_listens_beyond_loopback_and_no_control_socket_is_open(served):
    from aigc_ray.ingress import state_dir

    root = psutil.Process(served.proc.pid)
    tree = {p.pid: _cmd(p) for p in [root, *root.children(recursive=True)]}
    haproxy = [pid for pid, cmd in tree.items() if "haproxy" in cmd]
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in tree]
    wide = [(c.laddr.ip, c.laddr.port, c.pid, tree[c.pid]) for c in listening
            if not ipaddress.ip_address(c.laddr.ip).is_loopback]
    assert haproxy and any(c.pid in haproxy and c.laddr.port == served.port for c in listening)
    for ip, port, pid, cmd in wide:
        # Only Ray's own cluster ports: never HAProxy, the service port or a replica's HTTP port...
        assert pid not in haproxy and port != served.port and not 30000 <= port <= 31000, (ip, port, cmd[:120])
        assert any(k in cmd for k in RAY_PROCESSES) or pid == served.proc.pid, (ip, port, cmd[:120])
        # ...and none of them answers a request that carries no token (gRPC, or Ray's token check: 401).
        host = "127.0.0.1" if ip in ("0.0.0.0", "::") else ip
        try:
            code = httpx.get(f"http://{host}:{port}/", timeout=3).status_code
        except httpx.HTTPError:
            code = None
        assert code is None or code >= 400, (ip, port, cmd[:120], code)
    d = state_dir(served.port)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    sockets = [f for f in d.rglob("*") if stat.S_ISSOCK(f.stat().st_mode)]
    assert sockets and all(stat.S_IMODE(f.stat().st_mode) & 0o077 == 0 for f in sockets)


def test_a_replica_killed_under_load_loses_no_request(served):
    """8 clients (the project's Client) on 2 replicas; one replica is SIGKILLed: every request gets its answer,
    byte-identical to the answer for its seed before the kill. HAProxy retries a request whose replica died;
    the Client asks again on a connection that closed unanswered (HAProxy's reload after the replacement)."""
    from aigc_ray.client import Client, ServiceError

    seeds = list(range(16))
    c = Client(served.url)
    expected = {s: c.generate(n=4, seed=s, format="npy") for s in seeds}
    victims = served.replica_pids()
    log, stop = [], threading.Event()

    def client(k):
        c, i = Client(served.url), k
        while not stop.is_set():
            seed = seeds[i % len(seeds)]
            try:
                log.append(np.array_equal(c.generate(n=4, seed=seed, format="npy"), expected[seed]))
            except ServiceError as e:
                log.append(str(e))
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        os.kill(victims[0], signal.SIGKILL)
        served.wait_replicas(2, besides=(victims[0],))
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [entry for entry in log if entry is not True]
    print(f"replica killed under load: {len(log)} requests, {len(failed)} failed or different: {failed[:3]}")
    assert len(log) > 100 and not failed


def test_a_request_that_kills_every_replica_fails_once_and_the_service_recovers(served):
    t0 = time.time()
    try:  # HAProxy sends it to another replica, at most twice, then gives up: one failure, not a retry loop
        status = httpx.post(served.url + "/generate", json={"n": 1, "seed": 1}, headers={"x-aigc-ray-fault": "crash"},
                            timeout=120).status_code
    except httpx.RemoteProtocolError:  # HAProxy may close the connection instead of answering 500
        status = "closed"
    print(f"poison request: {status} after {time.time() - t0:.1f} s")
    assert (status == "closed" or status >= 500) and time.time() - t0 < 60
    served.wait_replicas(2, timeout=180)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.post(served.url + "/generate", json={"n": 1, "seed": 1}, timeout=30).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    ok = [httpx.post(served.url + "/generate", json={"n": 1, "seed": s}, timeout=30).status_code for s in range(8)]
    assert ok == [200] * 8


def test_overload_is_refused_at_once(served):
    """A burst of 80 slow requests (each holds its place 2 s; test-only) on 2 replicas that hold 16 + 8 each:
    48 are taken, the rest get 503 with Retry-After at once, and nobody waits without bound."""
    burst = 80
    ready = threading.Barrier(burst)

    def one(i):
        with httpx.Client(timeout=120) as c:
            ready.wait()
            t0 = time.time()
            r = c.post(served.url + "/generate", json={"n": 1, "seed": i}, headers={"x-aigc-ray-fault": "slow"})
            return r.status_code, r.headers.get("retry-after"), time.time() - t0

    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(one, range(burst)))
    refused = [r for r in results if r[0] == 503]
    print(f"burst of {burst} slow requests: statuses {sorted(Counter(r[0] for r in results).items())}, slowest "
          f"refusal {max((r[2] for r in refused), default=0):.2f} s, slowest answer {max(r[2] for r in results):.1f} s")
    assert refused and all(r[1] == "1" for r in refused)
    assert {r[0] for r in results} <= {200, 503}
    assert max(r[2] for r in refused) < 2  # refused at once, not after waiting in a queue
    assert max(r[2] for r in results) < 30  # and nobody waits without bound


def test_a_hard_kill_leaves_nothing_behind_and_the_next_service_on_the_port_is_exposed_with_https_and_a_key(
        served, checkpoint, tmp_path):
    """kill -9 of `aigc-ray serve`, then a new one on its port, now exposed: --host 0.0.0.0 with a key and a
    self-signed certificate (every request still goes to 127.0.0.1). It speaks only https, asks for its key
    (API, client, CLI, playground), and stops cleanly on SIGTERM."""
    cert, tls_key = _self_signed(tmp_path)
    key = "k" * 8 + os.urandom(12).hex()
    (tmp_path / "key").write_text(key + "\n")
    os.kill(served.proc.pid, signal.SIGKILL)  # the OOM killer, kill -9: no cleanup runs
    served.proc.wait()
    t0 = time.time()
    again = Served(checkpoint, tmp_path / "again.log", "--min-replicas", "2", "--max-replicas", "2", "--num-cpus",
                   "0.5", "--token-file", str(tmp_path / "key"), "--tls-cert", str(cert), "--tls-key", str(tls_key),
                   port=served.port, host="0.0.0.0", url="https://127.0.0.1", verify=str(cert), key=key)
    try:
        while "Serving at" not in again.log.read_text():  # the new one has the port: its own HAProxy bound it
            assert again.proc.poll() is None and time.time() - t0 < 60, again.log.read_text()[-3000:]
            time.sleep(0.5)
        again.wait_up(timeout=60 - (time.time() - t0))
        print(f"second aigc-ray serve on port {served.port} up {time.time() - t0:.1f} s after the first was SIGKILLed")
        # The port is the new service's, nothing of the old is left. Serve reloads HAProxy now and then (a new
        # process takes over, the old drains and exits between two looks), so only a listener seen outside
        # the service's process tree twice in a row is a stranger.
        seen: set = set()
        for _ in range(10):
            listeners = {c.pid for c in psutil.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == served.port}
            strangers = {pid for pid in listeners - _tree(again.proc.pid) if psutil.pid_exists(pid)}
            if (listeners and not strangers) or strangers & seen:
                break
            seen = strangers
            time.sleep(0.5)
        assert listeners and not strangers, [(p.pid, p.ppid(), p.cmdline()[:3]) for p in map(psutil.Process, strangers)]
        _speaks_https_and_asks_for_its_key(again, key, cert, tmp_path)
        _sigterm_while_serving(again)
    finally:
        again.stop()


def _speaks_https_and_asks_for_its_key(s: "Served", key: str, cert: Path, tmp_path: Path) -> None:
    with pytest.raises(httpx.TransportError):  # plain HTTP on the port gets no answer
        httpx.get(f"http://127.0.0.1:{s.port}/healthz", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # nor does a client that
        httpx.get(s.url + "/healthz", timeout=10)  # does not trust the certificate
    get = lambda path, **kw: httpx.get(s.url + path, timeout=30, verify=str(cert), **kw)  # noqa: E731
    assert get("/healthz").json()["auth"] is True
    for path in ("/info", "/sample.png", "/docs"):
        r = get(path)
        assert r.status_code == 401 and "API key" in r.json()["error"]
    assert get("/info", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert get("/info", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.post(s.url + "/generate", json={"n": 1, "seed": 0}, timeout=30, verify=str(cert),
                      headers=s.headers).status_code == 200

    from aigc_ray.client import Client, ServiceError

    assert Client(s.url, token=key, ca_file=str(cert)).grid(n=4, seed=0)[:4] == b"\x89PNG"
    with pytest.raises(ServiceError, match="401"):
        Client(s.url, ca_file=str(cert)).grid(n=4, seed=0)
    with pytest.raises(ServiceError, match="CERTIFICATE_VERIFY_FAILED"):
        Client(s.url, token=key).grid(n=4, seed=0)
    r = subprocess.run([str(BIN / "aigc-ray"), "sample", "--url", s.url, "--token-file", str(tmp_path / "key"),
                        "--ca-file", str(cert), "--n", "4", "--out", str(tmp_path / "g.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG", r.stderr
    _playground_with_a_key(s.url, key, tmp_path)


def _tree(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def _sigterm_while_serving(s: Served) -> None:
    """SIGTERM (systemd, Kubernetes, `timeout`) while 2 replicas answer: a clean stop, exit 0 or 143, never
    Ray's abort (134), and nothing left on the port."""
    s.wait_replicas(2)
    stop, codes = threading.Event(), []

    def client():
        while not stop.is_set():
            try:
                codes.append(httpx.post(s.url + "/generate", json={"n": 1, "seed": 0}, timeout=10, verify=s.verify,
                                        headers=s.headers).status_code)
            except httpx.HTTPError:
                codes.append(0)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(2)
    s.proc.send_signal(signal.SIGTERM)
    try:
        rc = s.proc.wait(timeout=90)
    finally:
        stop.set()
        t.join()
    log = s.log.read_text()
    assert rc in (0, 143) and "Aborted" not in log, (rc, log[-3000:])
    assert 200 in codes and "stopping: draining requests" in log
    assert not [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                and c.laddr.port == s.port]  # the ingress went with it


def test_a_port_held_by_something_else_is_named_in_one_line(checkpoint, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = subprocess.run([str(BIN / "aigc-ray"), "serve", "--checkpoint", checkpoint, "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and f"--port {port}: in use by pid {os.getpid()}" in lines[0]


def _lan_address() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def test_an_exposed_service_without_a_key_refuses_to_start(checkpoint):
    r = subprocess.run([str(BIN / "aigc-ray"), "serve", "--checkpoint", checkpoint, "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                         if k != "AIGC_RAY_TOKEN"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "needs an API key" in lines[0]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def test_an_exposed_service_with_a_key_but_no_tls_refuses_to_start(checkpoint, tmp_path):
    (tmp_path / "key").write_text("k" * 32)
    r = subprocess.run([str(BIN / "aigc-ray"), "serve", "--checkpoint", checkpoint, "--host", "0.0.0.0",
                        "--token-file", str(tmp_path / "key")], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "clear text" in lines[0] and "--insecure-http" in lines[0]
    r = subprocess.run([str(BIN / "aigc-ray"), "serve", "--checkpoint", checkpoint, "--host", "0.0.0.0",
                        "--token-file", str(tmp_path / "key"), "--tls-cert", str(tmp_path / "key"),
                        "--tls-key", str(tmp_path / "key")], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--tls-cert/--tls-key: cannot load" in lines[0], r.stderr


def _playground_with_a_key(url: str, key: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from conftest import chromium

    with sync_playwright() as p:
        browser = chromium(p)
        if browser is None:
            return  # the browser part needs Debian's chromium (make test installs it as root)
        page = browser.new_context(ignore_https_errors=True).new_page()  # the test's self-signed certificate
        page.goto(url + "/")
        page.wait_for_selector("#keyform", state="visible", timeout=30000)  # the page asks for the key
        assert page.is_hidden("#grid")
        page.fill("#key", key)
        page.click("#keyform button")
        page.wait_for_function("document.getElementById('grid').naturalWidth > 0", timeout=30000)
        page.screenshot(path=str(tmp_path / "playground-key.png"))
        browser.close()
