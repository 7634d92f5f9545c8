"""`make venv`'s install: aigc_ray[dev], editable, into the venv whose Python runs this.

uv installs the ~7 GB of wheels (torch and its CUDA libraries) and compiles their bytecode in ~1 min, where pip
takes ~2 min on this 2-core machine: it unpacks and compiles in parallel. (The bytecode matters here: with
PYTHONDONTWRITEBYTECODE=1 set, as on this machine, a venv without it compiles in every process.) It is given this
machine's pip configuration (find-links, indexes, constraints, certificate) and pip's rule for choosing among
indexes (the best version from any), so both pick the same wheels. Where uv cannot be installed or fails, pip does
the install.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

VENV = Path(sys.prefix)


def pip_config() -> dict[str, list[str]]:
    """pip's settings from its files and PIP_* variables (`pip config list`), each a list of values."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        try:
            conf[key.rsplit(".", 1)[-1]] = ast.literal_eval(value).split()  # later lines (PIP_* variables) win
        except (ValueError, SyntaxError, AttributeError):  # a line not in pip's key='value' form: not ours to read
            continue
    return conf


def uv_command(conf: dict[str, list[str]]) -> list[str]:
    cmd = [str(VENV / "bin" / "uv"), "pip", "install", "--quiet", "--python", sys.executable,
           "--index-strategy", "unsafe-best-match", "--compile-bytecode"]
    cmd += [a for url in conf.get("index-url", []) for a in ("--default-index", url)]
    cmd += [a for url in conf.get("extra-index-url", []) for a in ("--index", url)]
    cmd += [a for path in conf.get("find-links", []) for a in ("--find-links", path)]
    cmd += [a for path in conf.get("constraint", []) for a in ("--constraint", path)]
    return [*cmd, "-e", ".[dev]"]


def main() -> int:
    conf = pip_config()
    env = dict(os.environ, UV_CACHE_DIR=str(VENV / ".uv-cache"))  # the venv's disk: uv links its files from there
    if conf.get("cert"):
        env.setdefault("SSL_CERT_FILE", conf["cert"][0])
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if subprocess.run([*pip, "uv"]).returncode == 0 and subprocess.run(uv_command(conf), env=env).returncode == 0:
        return 0
    print("install: uv failed; pip installs instead (~2 min)", file=sys.stderr)
    return subprocess.run([*pip, "-e", ".[dev]"]).returncode


if __name__ == "__main__":
    sys.exit(main())
