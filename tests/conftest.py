"""Shared fixtures: one Ray cluster for the whole session (ray.init costs ~7 s here), tiny configs, and an
S3-compatible object store (moto's server on loopback, with real credential checks)."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# As init_ray does for the commands: Ray Train gives a worker group 60 s to start, and on a busy 2-CPU machine
# importing torch in fresh worker processes can take longer.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# As init_ray does for a cluster of our own: no PreemptionWatcher process per Train worker group.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# As init_ray does for a cluster of our own: the Train controller polls its workers every 0.5 s, not 2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("AIGC_RAY_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


# Modules whose tests start Ray clusters of their own (`ray start` nodes, the GPU check's script, CLI
# subprocesses) run first, in this order, before any test starts the session's cluster: an idle cluster costs
# ~7% of a CPU here (~12% with Serve up), which every test that runs beside it pays on 2 CPUs.
OWN_CLUSTERS = ("test_multinode.py", "test_gpu_check.py", "test_serving_trust.py")
GPU_SMOKE = ("test_gpu_check.py", "test_the_gpu_check_runs_every_step_on_the_cpu")
ROOT = Path(__file__).resolve().parents[1]
_smoke: dict = {}


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(OWN_CLUSTERS)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the order within stays


def pytest_collection_finish(session):
    """The GPU check's CPU smoke run (a process and a Ray cluster of its own, ~45 s) starts with the session,
    beside the multi-node module, whose processes leave a core idle while they start (~100 CPU-s of its
    ~190 s), on one torch thread to leave the module the other core; its test (the `gpu_smoke` fixture)
    waits for it and reads what it wrote."""
    if session.config.option.collectonly or not any((i.path.name, i.name) == GPU_SMOKE for i in session.items):
        return
    out = Path(tempfile.mkdtemp(prefix="aigc_gpu_smoke_"))
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        _smoke["proc"] = subprocess.Popen(["bash", "bench/gpu_check.sh", "--cpu-smoke", "--out", str(out / "check")],
                                          cwd=ROOT, stdout=stdout, stderr=stderr, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    _smoke["out"] = out


def pytest_sessionfinish(session):
    proc = _smoke.get("proc")
    if proc is not None and proc.poll() is None:  # its test did not run (-x stopped the session before it)
        proc.kill()
        proc.wait()
    if "out" in _smoke:
        shutil.rmtree(_smoke["out"], ignore_errors=True)


@pytest.fixture
def gpu_smoke():
    """`bash bench/gpu_check.sh --cpu-smoke`, started with the session: (its CompletedProcess, its --out folder)."""
    proc, out = _smoke["proc"], _smoke["out"]
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, (out / "stdout.txt").read_text(),
                                         (out / "stderr.txt").read_text())
    return result, out / "check"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if ray.is_initialized():  # a caller's own cluster (bench/gpu_bench.py runs the gpu tests inside its run)
        yield ray
        return
    # The dashboard stays on: Ray Train's placement-group cleaner needs its state API to free the CPUs
    # of trials that ASHA stops.
    ctx = ray.init(address="local", num_cpus=2, logging_level="WARNING")  # never a `ray start` cluster left around
    os.environ["AIGC_RAY_TEST_DASHBOARD"] = f"http://{ctx.dashboard_url}"  # for job submission (jobs/*.py)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny(tmp_path):
    """A tiny mnist-5k config writing under tmp_path: small nets, small batches, few steps."""
    from aigc_ray.config import Config, replace

    def make(**overrides):
        base = {"data.dataset": "mnist-5k", "model.ngf": 8, "model.ndf": 8, "model.latent_dim": 16,
                "train.batch_size": 16, "train.steps": 4, "train.log_every": 2, "train.ckpt_every": 2,
                "train.num_workers": 0, "run.name": "tiny", "run.storage": str(tmp_path / "runs")}
        base.update({k.replace("__", "."): v for k, v in overrides.items()})
        return replace(Config(), base)

    return make


@pytest.fixture
def bytes_by_replica():
    """ask(url): one /generate request (8 images, seed 123, npy) sent 32 times to a service of two replicas;
    each answer's bytes, by the replica that gave it (x-replica). Replicas are chosen at random: one alone
    answers all 32 requests 2^-31 of the time."""
    import httpx

    def ask(url: str) -> dict[str, set[bytes]]:
        by_replica: dict[str, set[bytes]] = {}
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(32):
                r = c.post("/generate", json={"n": 8, "seed": 123, "format": "npy"})
                assert r.status_code == 200
                by_replica.setdefault(r.headers["x-replica"], set()).add(r.content)
        return by_replica

    return ask


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with IAM authentication on (aigc_ray.testing.ObjectStore): a bucket
    `aigc`, and the environment (AWS_ENDPOINT_URL, keys, region) a process needs to use it."""
    from aigc_ray.testing import ObjectStore

    with ObjectStore(tmp_path_factory.mktemp("moto") / "moto.log") as store:
        yield store


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process talks to the test object store (storage's S3 filesystem rebuilt from the env)."""
    from aigc_ray import storage

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    storage._s3.cache_clear()
    yield s3
    storage._s3.cache_clear()


CHROMIUM = "/usr/bin/chromium"


def chromium(playwright):
    """Debian's Chromium, headless, with the flags this machine's closed network needs; None when absent."""
    import os

    if not os.path.exists(CHROMIUM):
        return None
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update"])


def _busy_cpu_s() -> float:
    """The machine's busy CPU seconds so far (every process: Ray's daemons and workers too), from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """AIGC_RAY_CPU_PROFILE=FILE: each test's wall and machine-wide CPU seconds (setup to teardown), written
    to FILE, costliest first. The suite is CPU-bound on 2 cores; this says where the CPU goes."""
    out = os.environ.get("AIGC_RAY_CPU_PROFILE")
    if not out:
        yield
        return
    import time

    t, c = time.monotonic(), _busy_cpu_s()
    yield
    _CPU_ROWS.append((_busy_cpu_s() - c, time.monotonic() - t, item.nodeid))
    with open(out, "w") as f:
        f.writelines(f"{cpu:8.1f} {wall:8.1f}  {name}\n" for cpu, wall, name in sorted(_CPU_ROWS, reverse=True))


_CPU_ROWS: list = []
