"""The command line as a user meets it: one clear line for mistakes, nothing written; JSON results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aigc_ray.cli import main


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "aigc_ray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "folder:EMPTY"], "holds no images"),
    (["--lr-g", "-1"], "optim.lr_g: must be > 0"),
    (["--image-size", "30"], "data.image_size: must be one of (32, 64, 128)"),
])
def test_bad_train_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    storage = tmp_path / "runs"
    r = _run("train", *args, "--storage", str(storage), "--name", "bad")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("aigc-ray: error:")
    assert "Traceback" not in r.stderr
    assert not storage.exists()


def test_sample_same_seed_same_image(tiny, tmp_path, capsys):
    from aigc_ray import train

    out = train.fit(tiny(), quiet=True)
    a, b, c = (tmp_path / f"{k}.png" for k in "abc")
    assert main(["sample", "--checkpoint", out["run_dir"], "--n", "16", "--seed", "3", "--out", str(a)]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", out["checkpoint"], "--n", "16", "--seed", "3", "--out", str(b),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and Path(result["out"]) == b
    assert main(["sample", "--checkpoint", out["checkpoint"], "--n", "16", "--seed", "4", "--out", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_sample_errors(tmp_path):
    r = _run("sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read"),
    ("{", "is not a search's best.json"),
    ('{"metric": "fid"}', "is not a search's best.json"),
    ('{"checkpoint": "MISSING"}', "does not exist"),
])
def test_serve_bad_best_json_is_one_line_before_ray(tmp_path, content, needle):
    best = tmp_path / "best.json"
    if content is not None:
        best.write_text(content.replace("MISSING", str(tmp_path / "gone")))
    r = _run("serve", "--best", str(best), "--ingress", "proxy")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
