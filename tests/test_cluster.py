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


def _statements(name: str) -> list[dict]:
    import json

    return json.loads((ROOT / "cluster" / f"{name}-policy.json").read_text())["Statement"]


def _listed(v) -> list:
    return v if isinstance(v, list) else [v]


def test_no_one_without_the_token_drives_the_cluster_and_each_role_has_least_privilege():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    env = next(c for c in raw["setup_commands"] if "aigc_ray_env" in c and "export" in c)
    assert "RAY_AUTH_MODE=token" in env  # every `ray start` and every client on a node sources this file
    assert all(". ~/.aigc_ray_env" in " ".join(raw[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert raw["file_mounts"]["/home/ubuntu/.ray/auth_token"].startswith("~/")  # one token, copied to every node
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    nodes = raw["available_node_types"]
    assert nodes["head_cpu"]["node_config"]["IamInstanceProfile"] == {"Name": "aigc-ray-head"}
    assert nodes["gpu_worker"]["node_config"]["IamInstanceProfile"] == {"Name": "aigc-ray-worker"}
    assert "FullAccess" not in (ROOT / "cluster.yaml").read_text().replace("# ", "")

    bucket = {"arn:aws:s3:::my-aigc-bucket", "arn:aws:s3:::my-aigc-bucket/*"}
    for st in _statements("worker"):  # the workers: the bucket, nothing else
        assert st["Effect"] == "Allow" and set(_listed(st["Resource"])) <= bucket
        assert all(a.startswith("s3:") and "*" not in a for a in _listed(st["Action"]))
    head = _statements("head")
    actions = {a for st in head for a in _listed(st["Action"])}
    assert not any(a.endswith("*") for a in actions) and "iam:CreateRole" not in actions
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= actions
    pass_role = next(st for st in head if "iam:PassRole" in _listed(st["Action"]))
    assert _listed(pass_role["Resource"]) == ["arn:aws:iam::*:role/aigc-ray-worker"]  # no escalation to the head's
    for st in head:
        if any(a.startswith("s3:") for a in _listed(st["Action"])):
            assert set(_listed(st["Resource"])) <= bucket
