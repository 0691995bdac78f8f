"""cluster.yaml: valid under Ray's own cluster schema, no credentials, only SSH opened."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)
    assert config["provider"]["type"] in ("aws", "gcp")
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1
    assert "pip install" in " ".join(config["setup_commands"]) and "~/cmd-ray" in config["file_mounts"]


def test_schema_validator_catches_a_broken_cluster_file():
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = yaml.safe_load(CLUSTER.read_text())
    broken["head_start_ray_commands"] = [{"ray start": "--head"}]
    with pytest.raises(Exception, match="is not of type 'string'"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_holds_no_credentials_and_opens_only_ssh():
    text = CLUSTER.read_text()
    assert not re.search(r"(?i)(aws_secret|aws_access_key|secret_access|api_key|password|AKIA[0-9A-Z]{16})", text)
    config = yaml.safe_load(text)
    ports = [(p["FromPort"], p["ToPort"]) for p in config["provider"]["security_group"]["IpPermissions"]]
    assert ports == [(22, 22)]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_cluster_yaml_defaults_to_s3_through_an_instance_profile_with_one_bucket_to_set():
    config = yaml.safe_load(CLUSTER.read_text())
    exports = [c for c in config["setup_commands"] if "export CMD_RAY_BUCKET=" in c]
    assert len(exports) == 1  # the one setting
    worker = config["available_node_types"]["gpu_worker"]["node_config"]
    assert worker["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}
    assert not any("mount" in c for c in config["setup_commands"])  # the EFS line stays a comment


def test_loopback_cluster_template_passes_rays_schema_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "launch" / "cluster-local.yaml.in").read_text()
    for placeholder, value in (("@SSH_USER@", "cmdray"), ("@SSH_KEY@", "/tmp/key"), ("@WORK@", "/tmp/w")):
        text = text.replace(placeholder, value)
    config = prepare_config(yaml.safe_load(text))
    validate_config(config)
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert not any("ray stop" in c for c in config["head_start_ray_commands"])
