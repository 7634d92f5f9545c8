"""Unsafe, truncated and half-written checkpoints are refused or skipped, with the file named."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from aigc_ray import checkpoint as ckpt
from aigc_ray import train


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from aigc_ray.config import Config, replace

    root = tmp_path_factory.mktemp("ck")
    cfg = replace(Config(), {"data.dataset": "mnist-5k", "model.ngf": 8, "model.ndf": 8, "model.latent_dim": 16,
                             "train.batch_size": 16, "train.steps": 4, "train.log_every": 2, "train.ckpt_every": 2,
                             "train.keep_checkpoints": 0, "train.num_workers": 0, "run.name": "r",
                             "run.storage": str(root)})
    return Path(train.fit(cfg, quiet=True)["run_dir"])


def _copy(run, tmp_path, step=4):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst, dst / f"checkpoint_{step:08d}"


def test_a_pickle_that_would_run_code_is_refused(run, tmp_path):
    _, c = _copy(run, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(c / "model.pt", weights_only=True)
    state["payload"] = _Evil(marker)
    torch.save(state, c / "model.pt")
    meta = json.loads((c / "meta.json").read_text())
    meta["files"]["model.pt"] = (c / "model.pt").stat().st_size  # a consistent but hostile checkpoint
    (c / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=r"cannot load .*model\.pt safely"):
        ckpt.load(c)
    assert not marker.exists()


def test_a_truncated_checkpoint_names_the_file(run, tmp_path):
    _, c = _copy(run, tmp_path)
    data = (c / "model.pt").read_bytes()
    (c / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_00000004 is incomplete"):
        ckpt.load(c)
    meta = json.loads((c / "meta.json").read_text())
    meta["files"]["model.pt"] = len(data) // 2
    (c / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=r"cannot load .*checkpoint_00000004/model\.pt"):
        ckpt.load(c)


def test_a_half_written_checkpoint_is_never_the_latest(run, tmp_path):
    dst, c4 = _copy(run, tmp_path)
    assert ckpt.find(dst) == str(c4)
    half = dst / "checkpoint_00000006"  # a crash mid-write: model.pt there, meta.json not yet
    half.mkdir()
    shutil.copy(c4 / "model.pt", half / "model.pt")
    assert ckpt.find(dst) == str(c4)
    (c4 / "samples.png").write_bytes(b"")  # a file shorter than meta.json says
    assert ckpt.find(dst) == str(dst / "checkpoint_00000002")
    # Resume picks the same: a run resumed from this folder continues from step 2.
    assert ckpt.load(dst)["step"] == 2


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.find(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.find(tmp_path)
    (tmp_path / "c").mkdir()
    torch.save({"hello": 1}, tmp_path / "c" / "model.pt")
    (tmp_path / "c" / "meta.json").write_text(json.dumps({"step": 1, "files": {}}))
    with pytest.raises(ckpt.CheckpointError, match="not an aigc_ray checkpoint"):
        ckpt.load(tmp_path / "c")
