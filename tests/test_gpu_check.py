"""bench/gpu_check.sh is not broken: its CPU smoke run goes through every step; without a GPU it says so."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_step_on_the_cpu(gpu_smoke):
    r, tmp_path = gpu_smoke  # `bash bench/gpu_check.sh --cpu-smoke --out tmp_path`, started with the session
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and report["device"] == "cpu (smoke)"
    assert all(report["training"][0][k] > 0 for k in ("fp32", "bf16", "fp16", "bf16+channels_last"))
    assert report["ray_train"]["images_per_s"] > 0 and report["fid"]["fid_s"] > 0
    assert report["serve"]["serve_n16"] > 0 and report["serve"]["limit_n64"] > 0
    assert set(report["tests"]) == {"passed"} and report["tests"]["passed"] >= 9  # none skipped or failed
    assert (tmp_path / "tests.txt").read_text().rstrip().splitlines()[-1].startswith(f"{report['tests']['passed']} passed")
    assert "| standard FID of 16 samples |" in r.stdout and "| device tests (tests/test_gpu.py) |" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "no GPU" in r.stdout
    assert not (tmp_path / "x").exists()
