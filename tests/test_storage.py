"""One storage module for every artefact: local folders and an S3-compatible object store behave alike."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_ray import checkpoint as ckpt
from aigc_ray import data, storage, train
from aigc_ray.cli import main
from aigc_ray.config import DataConfig


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """A fresh storage location: a local folder, or a prefix in the test bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = request.getfixturevalue("s3_env")
    return f"s3://{s3.bucket}/{request.node.name.replace('[', '-').rstrip(']')}"


def test_write_read_list_delete(location):
    a, b = storage.join(location, "a.txt"), storage.join(location, "sub", "b.bin")
    storage.write_text(a, "hello")
    storage.write_bytes(b, b"\x00" * 10)
    assert storage.read_text(a) == "hello" and storage.exists(b) and not storage.exists(storage.join(location, "c"))
    assert [(e.name, e.size) for e in storage.list_dir(location, recursive=True) if not e.is_dir] == \
        [("a.txt", 5), ("sub/b.bin", 10)]
    assert storage.is_dir(storage.join(location, "sub"))
    storage.delete(storage.join(location, "sub"))
    assert not storage.exists(b) and storage.list_dir(storage.join(location, "nothing-here")) == []
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes(storage.join(location, "missing.txt"))


def test_publish_writes_the_marker_last(location, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("meta.json", "model.pt", "samples.png", "config.json"):
        (src / name).write_text(name)
    order = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (order.append(storage.name(uri)), real(uri, data)))
    storage.publish_dir(src, storage.join(location, "ckpt"), last="meta.json")
    assert order[-1] == "meta.json" and sorted(order) == ["config.json", "meta.json", "model.pt", "samples.png"]
    assert storage.read_text(storage.join(location, "ckpt", "model.pt")) == "model.pt"


def test_checkpoints_on_s3_resume_sample_and_are_never_half_read(s3_env, tiny, tmp_path, capsys):
    root = f"s3://{s3_env.bucket}/unit-runs"
    out = train.fit(tiny(run__storage=root, train__keep_checkpoints=0), quiet=True)
    assert out["checkpoint"] == f"{root}/tiny/checkpoint_00000004" and out["step"] == 4
    resumed = train.fit(tiny(run__storage=root, train__steps=6, train__keep_checkpoints=0), quiet=True)
    assert ckpt.load(resumed["checkpoint"])["opt_g"]["state"][0]["step"] == 6  # resumed from S3, not restarted
    assert main(["sample", "--checkpoint", f"{root}/tiny", "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == (2 * 34 + 2, 2 * 34 + 2)
    # A checkpoint whose upload stopped half way (meta.json not yet there, or a file short) is skipped.
    half = f"{root}/tiny/checkpoint_00000008"
    storage.write_bytes(f"{half}/model.pt", storage.read_bytes(f"{resumed['checkpoint']}/model.pt"))
    assert ckpt.find(f"{root}/tiny") == resumed["checkpoint"]
    meta = json.loads(storage.read_text(f"{resumed['checkpoint']}/meta.json"))
    storage.write_text(f"{half}/meta.json", json.dumps({**meta, "step": 8}))
    storage.write_bytes(f"{half}/config.json", b"{}")  # shorter than meta.json says
    assert ckpt.find(f"{root}/tiny") == resumed["checkpoint"]
    with pytest.raises(ckpt.CheckpointError, match="is incomplete"):
        ckpt.load(half)


def _png(size=(24, 20), seed=0) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_dataset_from_an_object_store_prefix(s3_env, tmp_path):
    # A prefix of its own: the session's bucket also holds the multi-node tests' faces.
    faces = f"s3://{s3_env.bucket}/storage-test-faces"
    for i in range(5):
        storage.write_bytes(f"{faces}/{'ab'[i % 2]}/{i}.png", _png(seed=i))
    storage.write_text(f"{faces}/notes.txt", "not an image")
    cache = f"s3://{s3_env.bucket}/storage-test-cache"
    cfg = DataConfig(dataset=f"folder:{faces}/", image_size=32, cache=cache)
    ds = data.load(cfg)
    assert ds.images.shape == (5, 3, 32, 32) and ds.labels.tolist() == [0, 0, 0, 1, 1]  # a/ and b/: two labels
    assert [e.name for e in storage.list_dir(f"{cache}/decoded")]  # decoded once, cached under the storage
    local = tmp_path / "faces"
    for i in range(5):
        (local / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (local / "ab"[i % 2] / f"{i}.png").write_bytes(_png(seed=i))
    same = data.load(DataConfig(dataset=f"folder:{local}", image_size=32, cache=str(tmp_path / "c")))
    assert torch.equal(same.images, ds.images)  # the same decoding, wherever the files are
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(DataConfig(dataset=f"folder:s3://{s3_env.bucket}/nope/", cache=cache))


def _cli(monkeypatch, capsys, env, *args, cwd) -> tuple[int, list[str]]:
    """The CLI in this process, in env and cwd (no interpreter start-up): exit status and stderr's lines."""
    from aigc_ray import storage
    from aigc_ray.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)
    storage._s3.cache_clear()  # the S3 filesystem is rebuilt from this environment
    try:
        code = main(list(args))
    finally:
        storage._s3.cache_clear()
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case,needle", [
    ("missing bucket", "bucket 'no-such-bucket' does not exist"),
    ("bad credentials", "access to s3://aigc/runs denied: check the credentials"),
    ("unreachable", "cannot reach http://127.0.0.1:9 "),
    ("missing prefix", "folder s3://aigc/no/such/prefix does not exist"),
])
def test_unusable_storage_is_one_line_before_any_worker(s3, tmp_path, monkeypatch, capsys, case, needle):
    env = {**s3.env, "HOME": str(tmp_path)}
    monkeypatch.delenv("AIGC_RAY_CACHE", raising=False)
    storage_uri, dataset = "s3://aigc/runs", "mnist-5k"
    if case == "missing bucket":
        storage_uri = "s3://no-such-bucket/runs"
    elif case == "bad credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    else:
        dataset = "folder:s3://aigc/no/such/prefix/"
    code, lines = _cli(monkeypatch, capsys, env, "train", "--dataset", dataset, "--storage", storage_uri, "--name",
                       "bad", "--num-workers", "1", cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not s3.client.list_objects_v2(Bucket="aigc", Prefix="runs/bad").get("Contents")
    assert not list(tmp_path.rglob("aigc_ray"))  # nothing fell back to a local folder


@pytest.mark.parametrize("args,needle", [
    (["sample", "--checkpoint", "s3://aigc/nowhere"], "checkpoint: s3://aigc/nowhere does not exist"),
    (["sample", "--best", "s3://aigc/nowhere/best.json"], "best.json: cannot read s3://aigc/nowhere/best.json"),
    (["eval", "--checkpoint", "s3://no-such-bucket/x"], "checkpoint: s3://no-such-bucket/x does not exist"),
])
def test_reading_a_missing_uri_is_one_line(s3, tmp_path, monkeypatch, capsys, args, needle):
    code, lines = _cli(monkeypatch, capsys, s3.env, *args, cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
