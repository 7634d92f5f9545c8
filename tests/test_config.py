import dataclasses
import json

import pytest

from aigc_ray.config import Config, ConfigError, load_config, replace, validate
from aigc_ray.plan import resolve


def test_defaults_are_valid_and_frozen():
    cfg = validate(Config())
    assert cfg.data.image_size == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr_g = 1.0


def test_yaml_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr_g: 1e-4\n  lr_d: 3e-4\ntrain:\n  steps: 10\n")
    cfg = load_config(f, {"optim.lr_g": "5e-5"})
    assert cfg.optim.lr_g == 5e-5 and cfg.optim.lr_d == 3e-4 and cfg.train.steps == 10


def test_json_round_trip(tmp_path):
    cfg = replace(Config(), {"model.ngf": 32, "loss.name": "hinge"})
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg.to_dict()))
    assert load_config(f) == cfg


@pytest.mark.parametrize("key,value,needle", [
    ("optim.lr_g", -1, "optim.lr_g: must be > 0"),
    ("data.image_size", 30, "data.image_size: must be one of (32, 64, 128)"),
    ("loss.name", "wgan", "loss.name: must be one of"),
    ("train.steps", "ten", "train.steps: must be an integer"),
    ("data.dataset", "imagenet", "data.dataset: unknown dataset 'imagenet'"),
    ("run.name", "a/b", "run.name: must be one folder name"),
])
def test_errors_name_the_field_and_what_is_allowed(key, value, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, {key: value})
    assert needle in str(e.value)


def test_unknown_keys_and_sections_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        replace(Config(), {"optim.lr": 1})
    f = tmp_path / "c.yaml"
    f.write_text("optimizer:\n  lr_g: 1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(f)


def test_resolve_makes_auto_values_concrete():
    cfg = resolve(replace(Config(), {"loss.name": "wgan-gp", "model.conditional": True}), channels=1, num_classes=10)
    assert (cfg.data.channels, cfg.model.d_norm, cfg.loss.n_critic, cfg.model.num_classes) == (1, "none", 5, 10)
    assert cfg.train.amp == "none" and cfg.run.name.startswith("fashion-mnist-wgan-gp-")
    with pytest.raises(ConfigError, match="has no labels"):
        resolve(replace(Config(), {"model.conditional": True}), channels=3, num_classes=0)
