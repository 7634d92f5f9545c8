"""A fuzz test of the command line, in the spirit of the schemathesis test of the HTTP API: every subcommand's
flags drawn from the parser itself, values from their types and from hostile strings (negative and huge
numbers, NaN, empty strings, '..', absolute paths, URIs with bad schemes, non-UTF-8). Every run ends in exit 0
or in exit 2 with one line on stderr, never a traceback; it writes nothing; no Ray process starts."""

import argparse
import io
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aigc_ray.cli import build_parser, main

NEVER_DRAWN = {"--storage", "--address", "--help", "--dry-run", "--json", "--cache"}  # given, or not input
HOSTILE = ["", "..", "../../etc", "/", "/etc/passwd", "~", "-1", "0", "1e309", "nan", "NaN", "inf", "-inf",
           "99999999999999999999999", "-99999999999999999999", "2e11", "0x10", "ftp://host/x", "gs:/", "s3://",
           "s3://nobucket/x", "http://", "https://[::1", "file:///etc", "javascript:alert(1)", "folder:", "folder:..",
           "folder:/nonexistent", "a" * 300, "a/b", "\x00", "\udcff\udcfe", "caf\u00e9", " ", "--", "-"]
REAL = ["{CKPT}", "{CKPT}/meta.json", "{BEST}", "folder:{PHOTOS}", "mnist-5k", "{PHOTOS}", "8", "1", "0.5"]  # deeper


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name != "fid-ref"}  # fid-ref computes; it has no dry run


SUBCOMMANDS = _subcommands()


def _value(action: argparse.Action) -> st.SearchStrategy[list[str]]:
    flag = action.option_strings[-1]
    if action.nargs == 0:  # store_true, store_const, --x/--no-x
        return st.sampled_from(action.option_strings).map(lambda f: [f])
    typed = st.sampled_from(HOSTILE + REAL)
    if action.choices:
        typed = st.one_of(typed, st.sampled_from([str(c) for c in action.choices]))
    if action.type is int:
        typed = st.one_of(typed, st.integers(-2**70, 2**70).map(str))
    elif action.type is float:
        typed = st.one_of(typed, st.floats(allow_nan=True, allow_infinity=True).map(str))
    else:
        typed = st.one_of(typed, st.text(max_size=20))
    return typed.map(lambda v: [flag, v])


@st.composite
def command_lines(draw) -> list[str]:
    name = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    actions = [a for a in SUBCOMMANDS[name]._actions if a.option_strings and not NEVER_DRAWN & set(a.option_strings)]
    chosen = draw(st.lists(st.sampled_from(actions), max_size=4, unique_by=id))
    argv = [name]
    for a in chosen:
        argv += draw(_value(a))
    return argv


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A home, a folder of photos, a tiny checkpoint and its best.json: real values among the hostile ones."""
    import json

    from PIL import Image

    from aigc_ray import train
    from aigc_ray.config import Config, replace

    root = tmp_path_factory.mktemp("fuzz")
    (root / "home").mkdir()
    (root / "photos").mkdir()
    Image.new("RGB", (40, 40), "gray").save(root / "photos" / "a.png")
    out = train.fit(replace(Config(), {"data.dataset": "mnist-5k", "model.ngf": 8, "model.ndf": 8,
                                       "model.latent_dim": 16, "train.batch_size": 16, "train.steps": 2,
                                       "train.ckpt_every": 2, "train.num_workers": 0, "run.name": "real",
                                       "run.storage": str(root / "real")}), quiet=True)
    (root / "best.json").write_text(json.dumps({"checkpoint": out["checkpoint"], "metric": "fid", "value": 1.0}))
    return root, {"{CKPT}": out["checkpoint"], "{BEST}": str(root / "best.json"), "{PHOTOS}": str(root / "photos")}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
def test_any_command_line_ends_in_exit_0_or_one_line_and_exit_2(sandbox, argv):
    import ray

    sandbox, real = sandbox
    for key, path in real.items():
        argv = [a.replace(key, path) for a in argv]
    env = {"HOME": str(sandbox / "home"), "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AIGC_RAY_TOKEN": "",
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from aigc_ray import storage

    storage._s3.cache_clear()
    cwd, started = os.getcwd(), ray.is_initialized()
    os.chdir(sandbox)
    before = sorted(p for p in sandbox.rglob("*"))
    storage_flag = ["--storage", str(sandbox / "runs")] if "--storage" in SUBCOMMANDS[argv[0]]._option_string_actions else []
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            code = main([*argv, *storage_flag, "--dry-run"])
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        storage._s3.cache_clear()
    lines = err.getvalue().strip().splitlines()
    assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("aigc-ray: error:"), (argv, lines)
    assert "Traceback" not in err.getvalue()
    assert ray.is_initialized() == started  # a dry run, or a refusal, starts no Ray
    event(f"{argv[0]} exit {code}")
    assert sorted(p for p in sandbox.rglob("*")) == before, argv  # a dry run writes nothing
