"""Your digital double: the ORL faces offline, identities from folders (one subfolder per person), names
everywhere a class is taken."""

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_ray import data, train
from aigc_ray.config import Config, ConfigError, DataConfig, replace


def test_orl_faces_are_40_people_with_photos_9_and_10_held_out():
    tr, te = (data.load(DataConfig(dataset="orl-faces", image_size=32), s) for s in ("train", "test"))
    assert tr.images.shape == (320, 1, 32, 32) and te.images.shape == (80, 1, 32, 32)
    assert tr.labels.bincount().tolist() == [8] * 40 and te.labels.bincount().tolist() == [2] * 40
    assert data.class_names(DataConfig(dataset="orl-faces"))[:3] == ["s1", "s2", "s3"]
    flat = tr.images.flatten(1)
    assert not any((flat == t).all(1).any() for t in te.images.flatten(1))  # no held-out photo is trained on
    assert data.load(DataConfig(dataset="orl-faces", image_size=128), "test").images.shape[-2:] == (128, 128)
    assert data.is_people(DataConfig(dataset="orl-faces")) and data.size(DataConfig(dataset="orl-faces")) == 320


def _people(root, names, per=6):
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(per):
            shade = 40 + 180 * i // max(1, len(names) - 1)
            im = np.clip(rng.normal(shade, 20, (36, 36, 3)), 0, 255).astype("uint8")
            Image.fromarray(im).save(root / name / f"{j}.png")
    return root


def _tiny(tmp_path, folder, **kw):
    base = {"data.dataset": f"folder:{folder}", "data.channels": 1, "model.ngf": 8, "model.ndf": 8,
            "model.latent_dim": 16, "train.batch_size": 4, "train.steps": 2, "train.ckpt_every": 2,
            "train.num_workers": 0, "run.name": "people", "run.storage": str(tmp_path / "runs")}
    return replace(Config(), {**base, **kw})


def test_a_folder_of_people_trains_a_double_of_each_and_takes_their_names(tmp_path, capsys):
    from aigc_ray.cli import main
    from aigc_ray.serve import GenerateRequest, Sampler, class_index

    folder = _people(tmp_path / "photos", ["alice", "bob", "carol"])
    train.fit(_tiny(tmp_path, folder), quiet=True)
    out = train.fit(_tiny(tmp_path, folder, **{"train.steps": 4}), quiet=True)  # the same name resumes it
    assert out["step"] == 4
    sampler = Sampler(out["checkpoint"])
    info = sampler.info()
    assert info["conditional"] and info["class_names"] == ["alice", "bob", "carol"] and info["num_classes"] == 3
    assert class_index(sampler.cfg, "bob") == 1 == class_index(sampler.cfg, "1") == class_index(sampler.cfg, 1)
    with pytest.raises(ConfigError, match=r"--class: unknown class 'alcie'; nearest: alice"):
        class_index(sampler.cfg, "alcie")
    assert GenerateRequest.model_validate({"n": 1, "seed": 0, "class": "carol"}).class_ == "carol"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["sample", "--checkpoint", out["checkpoint"], "--class", "alice", "--n", "4", "--out", str(a)]) == 0
    assert main(["sample", "--checkpoint", out["checkpoint"], "--class", "0", "--n", "4", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()  # the name and the index are one class
    capsys.readouterr()
    assert main(["sample", "--checkpoint", out["checkpoint"], "--class", "alcie", "--out", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nearest: alice" in err[0]


def test_a_flat_folder_stays_unlabeled_and_bad_people_folders_are_one_line(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    assert data.class_names(DataConfig(dataset=f"folder:{flat}")) == [] and not data.is_people(
        DataConfig(dataset=f"folder:{flat}"))
    one = _people(tmp_path / "one", ["alice"])
    with pytest.raises(ConfigError, match="a conditional model needs at least 2 people"):
        train.prepare(_tiny(tmp_path, one, **{"model.conditional": True}))
    empty = _people(tmp_path / "empty", ["alice", "bob"])
    (empty / "carol").mkdir()
    with pytest.raises(ConfigError, match="subfolder 'carol' of .* holds no images"):
        data.class_names(DataConfig(dataset=f"folder:{empty}"))


@pytest.mark.parametrize("fmt,name", [("onnx", "g.onnx"), ("torchscript", "g.pt")])
def test_export_runs_outside_aigc_ray_and_draws_samples_pixels(tmp_path, capsys, fmt, name):
    """G_ema with a latent and a label input; the ONNX file runs in onnxruntime and matches `sample`."""
    import json

    import onnxruntime  # noqa: F401 -- the check below runs the file there

    from aigc_ray.cli import main

    folder = _people(tmp_path / "photos", ["alice", "bob"])
    out = train.fit(_tiny(tmp_path, folder), quiet=True)
    target = tmp_path / "export" / name
    assert main(["export", "--checkpoint", out["checkpoint"], "--format", fmt, "--out", str(target), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["inputs"] == ["z", "label"] and r["class_names"] == ["alice", "bob"] and target.stat().st_size > 1000
    assert r["checked_images"] == 16 and r["max_abs_pixel_diff"] <= 1 and r["max_abs_output_diff"] < 1e-4
    from aigc_ray.export import run_exported
    from aigc_ray.seeds import image_seeds, latents

    images = run_exported(target, fmt, (latents(image_seeds(5, 3), 16), torch.tensor([1, 0, 1])))
    assert images.shape == (3, 1, 32, 32) and float(images.abs().max()) <= 1.0  # any batch size, any label
    assert main(["export", "--checkpoint", str(tmp_path / "gone"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def _pasted(seed: int, person: int, photo: int = 1) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """An ORL photo pasted at a random offset and scale into a larger, smooth random background; returns the
    picture and where the face's square went (x, y, w, h)."""
    import cv2

    rng = np.random.default_rng(seed)
    face = np.asarray(Image.open(data.find_orl() / f"s{person}" / f"{photo}.pgm").convert("RGB"))
    scale = rng.uniform(1.0, 2.0)
    face = cv2.resize(face, (int(92 * scale), int(112 * scale)))
    h, w = 360, 480
    img = cv2.resize(rng.integers(0, 256, (6, 8, 3)).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    x0, y0 = int(rng.integers(0, w - face.shape[1])), int(rng.integers(0, h - face.shape[0]))
    img[y0:y0 + face.shape[0], x0:x0 + face.shape[1]] = face
    left, top, right, bottom = data.ORL_CROP
    return img, (x0 + left * scale, y0 + top * scale, (right - left) * scale, (bottom - top) * scale)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def test_faces_pasted_into_larger_pictures_are_found_where_they_were_put():
    import cv2

    from aigc_ray.data import faces

    ious = []
    for k in range(20):
        img, truth = _pasted(k, person=2 * k + 1)
        box = faces.find_face(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
        ious.append(0.0 if box is None else _iou(faces.crop_box(box), truth))
    assert min(ious) >= 0.5, [round(i, 2) for i in ious]


def test_face_crop_trains_on_the_faces_and_counts_the_photos_without_one(tmp_path, capsys):
    photos = tmp_path / "everyday"
    photos.mkdir()
    for k in range(3):
        Image.fromarray(_pasted(100 + k, person=k + 1)[0]).save(photos / f"{k}.jpg")
    Image.fromarray(np.full((200, 300, 3), 120, np.uint8)).save(photos / "wall.jpg")  # no face in it
    cfg = DataConfig(dataset=f"folder:{photos}", image_size=32, face_crop=True)
    faces_only = data.load(cfg)
    assert len(faces_only) == 3 and data.size(cfg) == 3
    assert "a face in 3 of 4 photos; the 1 without one are skipped" in capsys.readouterr().out
    nothing = tmp_path / "walls"
    nothing.mkdir()
    Image.fromarray(np.full((200, 300, 3), 90, np.uint8)).save(nothing / "a.png")
    with pytest.raises(ConfigError, match="no face found in any of the 1 photos"):
        data.load(DataConfig(dataset=f"folder:{nothing}", face_crop=True))
    with pytest.raises(ConfigError, match="data.face_crop: is for folders"):
        from aigc_ray.config import validate

        validate(replace(Config(), {"data.face_crop": True}))


def test_invert_finds_a_latent_whose_image_is_the_reconstruction(tmp_path, capsys):
    import json

    from aigc_ray.cli import main
    from aigc_ray.serve import Sampler

    folder = _people(tmp_path / "photos", ["alice", "bob"])
    out = train.fit(_tiny(tmp_path, folder, **{"train.steps": 4}), quiet=True)
    me = tmp_path / "me.png"
    Image.fromarray(np.full((50, 40, 3), 200, np.uint8)).save(me)
    assert main(["invert", "--checkpoint", out["checkpoint"], "--image", str(me), "--class", "bob", "--steps", "30",
                 "--out", str(tmp_path / "me"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["files"] == ["latent.npz", "loss.png", "reconstruction.png"] and r["class"] == "bob"
    saved = np.load(tmp_path / "me" / "latent.npz")
    assert saved["z"].shape == (16,) and int(saved["label"]) == 1 and saved["losses"][-1] < saved["losses"][0]
    sampler = Sampler(out["checkpoint"])  # the latent is usable where a seed is: its image is the reconstruction
    again = sampler.forward(torch.from_numpy(saved["z"])[None], [1])[0]
    recon = np.asarray(Image.open(tmp_path / "me" / "reconstruction.png"))  # [photo | G(z)], 2 px apart
    right = recon[2:34, 36:68].reshape(32, 32, -1)[..., :1]
    assert np.abs(right.astype(int) - again.astype(int)).max() <= 1
    for args, needle in [(["--class", "zed"], "unknown class 'zed'"), ([], "this model is conditional"),
                         (["--class", "bob", "--image", str(tmp_path / "me" / "latent.npz")], "not an image")]:
        image = [] if "--image" in args else ["--image", str(me)]
        code = main(["invert", "--checkpoint", out["checkpoint"], *image, *args, "--steps", "1", "--out",
                     str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "bad").exists()
