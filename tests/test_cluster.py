"""The cluster files: cluster.yaml and serve/config.yaml pass Ray's own schemas and set up shared storage.

Jobs on a real multi-node cluster are in test_multinode.py."""

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and cfg["head_node_type"] == "head_cpu"
    # Every node reaches the one storage location: named once, reached through the same instance profile.
    for node_type in cfg["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "aigc-ray-node"}
    assert any("AIGC_RAY_STORAGE=s3://" in c for c in cfg["setup_commands"])
    assert all(". ~/.aigc_ray_env" in " ".join(cmds) for cmds in (cfg["head_start_ray_commands"],
                                                                  cfg["worker_start_ray_commands"]))
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "none"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_serve_config_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    from aigc_ray.serve import ServeArgs

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve/config.yaml").read_text()))
    app = schema.applications[0]
    assert app.import_path == "aigc_ray.serve:app_builder"
    ServeArgs(**app.args)  # the args are what the typed builder takes
