import json
import os
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_under_rays_own_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.load(open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")))
    jsonschema.validate(load(), schema)  # the file as written: no unknown keys
    validate_config(prepare_config(load()))  # and what `ray up` checks after filling defaults
    gpu = load()["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 < gpu["max_workers"]


def test_cluster_yaml_does_not_expose_the_dashboard():
    head = " ".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_every_key_is_commented():
    lines = (ROOT / "cluster.yaml").read_text().splitlines()
    keys = 0
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_]+:", line):
            keys += 1
            assert lines[i - 1].strip().startswith("#"), f"line {i + 1} has no comment above it: {line!r}"
    assert keys > 20


def test_cluster_yaml_pins_the_ray_this_package_runs_and_uses_a_bucket():
    import ray

    cfg = load()
    setup = " ".join(cfg["setup_commands"])
    assert f'ray[default]=={ray.__version__}' in setup and "datamodels[s3]" in setup
    assert "s3://" in " ".join(cfg["head_setup_commands"])
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}  # nothing trains or fits there
    pipeline = yaml.safe_load((ROOT / "pipelines" / "cifar10.yaml").read_text())["resources"]
    assert pipeline["fit_on"] == "cluster" and pipeline["fit_gpus"] >= 1
