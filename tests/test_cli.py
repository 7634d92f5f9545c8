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


def _main(capsys, *args) -> tuple[int, list[str]]:
    """The CLI in this process (no interpreter start-up): exit status and stderr's lines."""
    import ray

    started = ray.is_initialized()
    code = main(list(args))
    assert ray.is_initialized() == started  # a refusal comes before Ray starts
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "folder:EMPTY"], "holds no images"),
    (["--lr-g", "-1"], "optim.lr_g: must be > 0"),
    (["--image-size", "30"], "data.image_size: must be one of (32, 64, 128)"),
])
def test_bad_train_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    storage = tmp_path / "runs"
    code, lines = _main(capsys, "train", *args, "--storage", str(storage), "--name", "bad")
    assert code == 2
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("aigc-ray: error:")
    assert not storage.exists()


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    r = _run("train", "--dataset", "imagenet", "--storage", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "aigc-ray: error: data.dataset: unknown dataset 'imagenet'; allowed: fashion-mnist, mnist-5k, mnist, "
        "cifar10, celeba, orl-faces, folder:PATH"] and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [  # issue 29's list: each ended in a traceback or a write outside
    (["train", "--name", "."], "run.name: must be one folder name"),
    (["train", "--name", ".."], "run.name: must be one folder name"),
    (["tune", "--name", "../../x"], "--name: must be one folder name"),
    (["tune", "--name", "/abs/x"], "--name: must be one folder name"),
    (["pipeline", "--name", "../x"], "--name: must be one folder name"),
    (["train", "--seed", "2e11"], "train.seed: must be an integer"),
    (["train", "--seed", "200000000000000000000"], "train.seed: must be in [0, 4611686018427387904]"),
    (["sample", "--url", "localhost"], "--url: must look like http(s)://HOST:PORT"),
    (["sample", "--url", "ftp://x:1"], "--url: must look like http(s)://HOST:PORT"),
    (["sample", "--seed", "-1", "--checkpoint", "x"], "--seed: must be in [0,"),
    (["serve", "--checkpoint", "CKPT", "--max-n", "2000"], "--max-n: input should be less than or equal to 1024"),
    (["serve", "--checkpoint", "CKPT", "--port", "70000"], "--port: must be in 1..65535"),
    (["serve", "--checkpoint", "CKPT", "--min-replicas", "3", "--max-replicas", "1"], "need 1 <= min <= max"),
    (["pipeline", "--dataset", "folder:FOLDER", "--dp-epsilon", "1"], "train.eval_dataset: a DP run is scored"),
])
def test_careless_input_ends_in_one_line_before_ray(tmp_path, capsys, args, needle):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "folder").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "a.png")
    args = [a.replace("CKPT", str(tmp_path / "ckpt")).replace("FOLDER", str(tmp_path / "folder")) for a in args]
    storage = ["--storage", str(tmp_path / "runs")] if args[0] in ("train", "tune", "pipeline") else []
    code, lines = _main(capsys, *args, *storage)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


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


def test_sample_errors(tmp_path, capsys):
    code, lines = _main(capsys, "sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and "does not exist" in lines[0] and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read"),
    ("{", "is not a search's best.json"),
    ('{"metric": "fid"}', "is not a search's best.json"),
    ('{"checkpoint": "MISSING"}', "does not exist"),
])
def test_serve_bad_best_json_is_one_line_before_ray(tmp_path, capsys, content, needle):
    best = tmp_path / "best.json"
    if content is not None:
        best.write_text(content.replace("MISSING", str(tmp_path / "gone")))
    code, lines = _main(capsys, "serve", "--best", str(best), "--ingress", "proxy")
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
