"""README's commands work: every `aigc-ray` line of its code blocks, run with --dry-run against a test
storage, resolves and validates everything that can be checked before Ray starts and exits 0."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from aigc_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The `aigc-ray ...` lines of README's fenced code blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("aigc-ray "):
                out.append(shlex.split(line, comments=True)[1:])
    return out


def test_readme_has_the_commands_a_user_runs():
    commands = {c[0] for c in readme_commands()}
    assert {"train", "sample", "eval", "tune", "serve", "pipeline", "forget", "invert", "export"} <= commands


@pytest.fixture
def a_users_machine(tmp_path, monkeypatch, s3_env):
    """HOME with a folder of photos, the README's buckets on the test object store, a key and a certificate."""
    from PIL import Image

    home = tmp_path / "home"
    for folder in ("me/photos", "people/alice", "people/bob"):
        (home / folder).mkdir(parents=True)
        Image.new("RGB", (40, 40), "gray").save(home / folder / "a.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AIGC_RAY_STORAGE", raising=False)
    for bucket in ("my-bucket", "my-aigc-bucket"):
        s3_env.client.create_bucket(Bucket=bucket)
    s3_env.client.put_object(Bucket="my-bucket", Key="faces/a.png", Body=(home / "me" / "photos" / "a.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), "gray").save(tmp_path / "me.jpg")
    (tmp_path / "key").write_text("k" * 32)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    return tmp_path


def test_every_readme_command_passes_its_dry_run(a_users_machine, capsys):
    import ray

    started = ray.is_initialized()
    for args in readme_commands():
        code = main([*args, "--dry-run"])
        out = capsys.readouterr()
        assert code == 0, f"aigc-ray {shlex.join(args)}: {out.err.strip()}"
        said = [line for line in out.out.splitlines() if line.strip()]
        assert said and ("dry run: would" in said[-1] or '"dry_run": true' in said[-1] or args[0] == "forget"), said
    assert ray.is_initialized() == started  # nothing started Ray
    assert not list(a_users_machine.glob("home/aigc_ray/runs/*"))  # and nothing was written
