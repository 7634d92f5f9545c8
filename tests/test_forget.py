"""Private data private by construction: a run on someone's photos keeps pixels, never their file names or
metadata (trained, sampled, audited and reported); and `aigc-ray forget` removes everything derived from a
folder of photos, and nothing else."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigc_ray import audit, cli, train
from aigc_ray import checkpoint as ckpt
from aigc_ray.config import Config, replace

NAME, MARKER = "alice_smith_passport", "MARKER-7f3a9c51"


def _photos(folder: Path, n: int, seed: int, private: bool = False) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.fromarray((rng.random((48, 40, 3)) * 255).astype("uint8"))
        exif = Image.Exif()
        if private and i == 0:  # the one photo a leak would show: its name, GPS and a unique description
            exif[0x010E] = MARKER
            exif[0x8825] = {1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 40.0)}
        im.save(folder / (f"{NAME}.jpg" if private and i == 0 else f"img{i:03d}.jpg"), "JPEG", exif=exif)
    if private:
        assert MARKER.encode() in (folder / f"{NAME}.jpg").read_bytes()


def _cfg(tmp_path, folder: Path, name: str):
    return replace(Config(), {"data.dataset": f"folder:{folder}", "data.limit": 16, "data.channels": 1,
                              "model.ngf": 8, "model.ndf": 8, "model.latent_dim": 16, "train.batch_size": 8,
                              "train.steps": 2, "train.log_every": 1, "train.ckpt_every": 2, "train.num_workers": 0,
                              "run.name": name, "run.storage": str(tmp_path / "runs")})


def _every_byte(root: Path) -> bytes:
    return b"".join(p.name.encode() + p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    """A run on a folder holding Alice's passport photo, and a run on someone else's folder."""
    monkeypatch.setenv("AIGC_RAY_CACHE", str(tmp_path / "cache"))
    _photos(tmp_path / "src" / "mine", 24, seed=0, private=True)
    _photos(tmp_path / "src" / "theirs", 24, seed=1)
    mine = train.fit(_cfg(tmp_path, tmp_path / "src" / "mine", "mine"), quiet=True)
    theirs = train.fit(_cfg(tmp_path, tmp_path / "src" / "theirs", "theirs"), quiet=True)
    return mine, theirs


def test_storage_and_caches_hold_pixels_never_a_photos_name_or_metadata(two_runs, tmp_path, capsys):
    mine, _ = two_runs
    assert cli.main(["sample", "--checkpoint", mine["checkpoint"], "--n", "4", "--out",
                     str(tmp_path / "runs" / "mine" / "grid.png")]) == 0
    found = audit.run(mine["checkpoint"], num_samples=8, heldout=8, features="inception")
    assert found["heldout_images"] == 8 and Path(found["pairs_png"]).exists()
    from aigc_ray import report

    search = {"search": str(tmp_path / "runs" / "mine"), "metric": "fid", "value": 1.0, "trial_id": "t", "step": 2,
              "steps_run": 2, "steps_full_grid": 2, "table": []}
    page = report.write(str(tmp_path / "runs" / "mine"), search=search, final={**mine, "step": 2},
                        fid={"value": 1.0, "num_samples": 8}, url="http://127.0.0.1:9", stages={"total": 1.0},
                        audit=audit.summary(found))
    assert Path(page).exists() and (Path(page).parent / "audit_pairs.png").exists()
    written = _every_byte(tmp_path / "runs") + _every_byte(tmp_path / "cache")
    assert len(written) > 10_000 and list((tmp_path / "cache" / "decoded").iterdir())
    assert NAME.encode() not in written and MARKER.encode() not in written


def test_forget_lists_then_deletes_everything_derived_from_a_folder_and_nothing_else(two_runs, tmp_path, capsys):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    mine_src = f"folder:{tmp_path / 'src' / 'mine'}"
    assert cli.main(["forget", "--dataset", mine_src, "--storage", str(storage), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed["found"] == 2 and listed["deleted"] == 0 and (storage / "mine").exists()  # the run + its cache
    assert cli.main(["forget", "--dataset", mine_src, "--storage", str(storage), "--yes"]) == 0
    assert not (storage / "mine").exists() and (storage / "theirs").exists()
    left = [p.name for p in (cache / "decoded").iterdir()]
    assert len(left) == 1  # theirs; the sample of theirs still loads
    assert ckpt.read_meta(ckpt.find(str(storage / "theirs")))["step"] == 2
    assert cli.main(["forget", "--dataset", "fashion-mnist", "--storage", str(storage)]) == 2
    assert "folder:PATH" in capsys.readouterr().err
