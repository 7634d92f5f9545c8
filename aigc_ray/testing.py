"""A real multi-node Ray cluster on one machine, whose nodes share no files, and an S3-compatible server.

    with ObjectStore() as s3, Cluster.up(tmp, env=s3.env, nodes=1) as c:  # head: 0 CPUs; a node of its own
        node = c.nodes[0]
        c.cli("train", "--storage", "s3://aigc/runs", ...)          # a driver on the head's machine
        c.kill_node(node)                                           # every process of that node, at once

What the multi-node tests and `bench/train_throughput.py --cluster` run on (Linux, as root):
- The head: `ray start --head --num-cpus 0`, so no Train worker, trial, task or replica runs there.
- A worker node: `ray start --address ...` inside its own mount and PID namespaces (`unshare -m -p`),
  with tmpfs over /tmp, /dev/shm, the caches and its home folder. It sees the installed package and
  nothing another process wrote, as a separate machine would; its auth token and S3 credentials come
  from its environment, as a real node's would. Killing the init of its PID namespace kills every
  process of the node at once: a machine going away.
- The object store: moto's S3 server on 127.0.0.1 with IAM authentication on (wrong keys are refused
  as AWS refuses them), a user allowed s3:*, and a bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .ingress import free_ports  # noqa: F401  (the tests take it from here too)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


class ObjectStore:
    """moto's S3 server on loopback, with real credential checks, one user and one bucket."""

    def __init__(self, log: Path | str = os.devnull, bucket: str = "aigc"):
        import boto3

        (self.port,) = free_ports(1)
        self.endpoint, self.bucket = f"http://127.0.0.1:{self.port}", bucket
        # The first three requests (the user, its key and its policy) run unauthenticated; every later one
        # must be signed with that user's keys.
        self.server = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from moto.server import ThreadedMotoServer as T; "
             "T(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start(); time.sleep(1e9)",
             str(self.port)], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
            stdout=open(log, "w"), stderr=subprocess.STDOUT)
        try:
            _wait_port(self.port)
            iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                               aws_access_key_id="setup", aws_secret_access_key="setup")
            iam.create_user(UserName="aigc")
            key = iam.create_access_key(UserName="aigc")["AccessKey"]
            iam.put_user_policy(UserName="aigc", PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}
            self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                       aws_access_key_id=key["AccessKeyId"],
                                       aws_secret_access_key=key["SecretAccessKey"])
            self.client.create_bucket(Bucket=bucket)
        except BaseException:
            self.close()
            raise

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read_json(self, key: str):
        """The object at key, parsed as JSON."""
        return json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def close(self) -> None:
        self.server.kill()
        self.server.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Cluster:
    """A head node with no CPUs; worker nodes added in namespaces of their own. Stopped on close."""

    def __init__(self, tmp: Path | str, env: dict[str, str] | None = None, head_env: dict[str, str] | None = None):
        self.tmp = Path(tmp)
        self.port, self.dash, *agent = free_ports(6)
        self.env = {**os.environ, **(env or {}), "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_DEDUP_LOGS": "1",
                    # A lost node is declared dead after 3 missed 1-second health checks (Ray's default: 5 of 3 s
                    # each), so the tests that take a machine away wait seconds, not half a minute, for Ray to see it.
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        self.env.pop("AIGC_RAY_CACHE", None)  # caches go under the storage, as on a real cluster
        self.address, self.dashboard = f"127.0.0.1:{self.port}", f"http://127.0.0.1:{self.dash}"
        # Another Ray instance may run on this machine (a test session's own): every process of this cluster
        # (Ray Train's placement-group cleaner among them) must know which one is its own.
        self.env["RAY_ADDRESS"] = self.address
        self.nodes: list[subprocess.Popen] = []
        self.killed: list[subprocess.Popen] = []
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Ray's session folder holds Unix sockets, whose paths may not exceed 107 bytes: under a deep folder
        # (pytest's tmp, start1/, Ray's session name with its PID) the head fails to start. A short one of its
        # own, whose logs close() keeps in tmp/head-logs.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="aigc-head-", dir="/tmp"))
        self.head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=0", "--node-ip-address=127.0.0.1",
             f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
             "--include-dashboard=true", *self._agent_flags(agent), "--object-store-memory=500000000",
             "--disable-usage-stats", f"--temp-dir={self.ray_tmp}"],
            env={**self.env, **(head_env or {})}, stdout=open(self.tmp / "head.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)

    @classmethod
    @contextlib.contextmanager
    def up(cls, tmp: Path | str, env: dict[str, str] | None = None, nodes: int = 1, cpus: int = 2,
           attempts: int = 2, say=None, first_head_env: dict[str, str] | None = None):
        """A started cluster: the head and `nodes` worker nodes alive, stopped on exit. A start that fails
        (a port another process took meanwhile, a head too slow on a busy machine) is said (on stderr, or to
        `say`) with its logs and tried again from scratch, on fresh ports, up to `attempts` times in all.
        first_head_env: more environment for the first attempt's head (a test of a failing start: how long
        that head waits for its GCS before it gives up)."""
        say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        for attempt in range(1, attempts + 1):
            c = cls(Path(tmp) / f"start{attempt}", env, head_env=first_head_env if attempt == 1 else None)
            try:
                c.wait_nodes(1)
                for _ in range(nodes):
                    c.add_node(cpus=cpus)
                c.wait_nodes(1 + nodes)
            except (RuntimeError, TimeoutError) as e:
                c.close()
                if attempt == attempts:
                    raise
                say(f"[nodes] cluster start {attempt} of {attempts} failed; starting afresh: {e}")
                continue
            with c:
                yield c
            return

    @staticmethod
    def _agent_flags(ports) -> list[str]:
        # Every node needs agent ports of its own: they all listen on the same loopback address.
        a, g, r, m = ports
        return [f"--dashboard-agent-listen-port={a}", f"--dashboard-agent-grpc-port={g}",
                f"--runtime-env-agent-port={r}", f"--metrics-export-port={m}"]

    def add_node(self, cpus: int = 2) -> subprocess.Popen:
        """A worker node in its own mount + PID namespace, seeing none of the files others wrote."""
        home = Path.home()
        if Path("/tmp") in (REPO.resolve(), *REPO.resolve().parents):
            raise RuntimeError(f"the repository is under /tmp ({REPO}), which every worker node replaces with a "
                               "fresh tmpfs, so the node could not run its venv: check it out elsewhere")
        hide = [p for p in (home / ".cache", home / "aigc_ray", home / ".ray", REPO / ".cache", REPO / "runs")
                if p.is_dir()]
        mounts = "; ".join(["mount -t tmpfs none /tmp", "mount -t tmpfs none /dev/shm",
                            *(f"mount -t tmpfs none {p}" for p in hide), "mkdir -p /tmp/home"])
        ray = " ".join([str(BIN / "ray"), "start", "--block", f"--address={self.address}", f"--num-cpus={cpus}",
                        "--node-ip-address=127.0.0.1", "--object-store-memory=500000000", "--disable-usage-stats",
                        *self._agent_flags(free_ports(4)), "--temp-dir=/tmp/ray"])
        log = open(self.tmp / f"node{len(self.nodes)}.log", "w")
        node = subprocess.Popen(["unshare", "-m", "-p", "--fork", "--mount-proc", "bash", "-c",
                                 f"set -e; {mounts}; export HOME=/tmp/home; cd /tmp/home; exec {ray}"],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        return node

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL the node's PID-namespace init: the kernel kills every process of that node at once."""
        import psutil

        self.killed.append(node)
        for child in psutil.Process(node.pid).children():
            child.kill()
        node.wait(timeout=60)

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    def alive_nodes(self) -> int:
        import httpx

        r = httpx.get(f"{self.dashboard}/api/v0/nodes", headers=self.auth, timeout=30,
                      params={"filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"})
        return len(r.json()["data"]["result"]["result"])

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        """Until n nodes (the head among them) are alive; a head or node that exits first fails at once.
        Either failure carries the last lines of the logs that say why."""
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            exited = [name for name, p in self._processes() if p.poll() is not None]
            if exited:
                raise RuntimeError(f"{', '.join(exited)} exited while waiting for {n} nodes\n{self.logs()}")
            try:
                if self.alive_nodes() == n:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{n} nodes not alive after {timeout} s; the logs are in {self.tmp}\n{self.logs()}")

    def _processes(self) -> list[tuple[str, subprocess.Popen]]:
        return [("the head", self.head), *((f"node{i}", p) for i, p in enumerate(self.nodes)
                                           if p not in self.killed)]

    @property
    def _ray_logs(self) -> Path:
        return self.ray_tmp / "session_latest" / "logs"

    def logs(self, lines: int = 15) -> str:
        """The last lines of the head's and the nodes' output and of the head's Ray logs (a node's own Ray logs
        are in its namespace's /tmp, gone with it)."""
        files = [self.tmp / "head.log", *sorted(self.tmp.glob("node*.log")),
                 *(self._ray_logs / f for f in ("gcs_server.out", "raylet.out", "dashboard.log", "dashboard.err"))]
        out = []
        for f in files:
            if f.is_file():
                tail = [line[:300] for line in f.read_text(errors="replace").splitlines()
                        if "(+0x" not in line][-lines:]  # native stack frames say nothing here
                out.append(f"--- {f.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out) or f"(no logs under {self.tmp})"

    def cli(self, *args, timeout: float = 600, env: dict | None = None, connect: bool = True,
            **kw) -> subprocess.CompletedProcess:
        """An aigc-ray command whose driver runs here, on the head's machine, against this cluster."""
        address = ["--address", self.address] if connect else []
        return subprocess.run([str(BIN / "aigc-ray"), *args, *address], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, **kw)

    def cli_bg(self, *args, log: Path, env: dict | None = None, **kw) -> subprocess.Popen:
        """cli() in the background, its output in log."""
        return subprocess.Popen([str(BIN / "aigc-ray"), *args, "--address", self.address],
                                env={**self.env, **(env or {})}, stdout=open(log, "w"), stderr=subprocess.STDOUT, **kw)

    def close(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                self.kill_node(node)
        self.head.send_signal(signal.SIGTERM)  # --block: stopping this process stops the head
        try:
            self.head.wait(timeout=3)
        except subprocess.TimeoutExpired:  # a head still draining (a Serve app, a job) after 3 s: its whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.head.pid, signal.SIGKILL)
            self.head.wait(timeout=30)
        if self._ray_logs.is_dir():  # kept beside the nodes' logs; the sockets and the rest go
            shutil.copytree(self._ray_logs, self.tmp / "head-logs", dirs_exist_ok=True, ignore_dangling_symlinks=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
