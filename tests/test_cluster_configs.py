"""The `ray up` configs in cluster/: each passes Ray's own cluster-config schema, checked the way
`ray up` checks it before it launches anything (offline: no cloud is called), and each node
installs the versions the project pins, runs with token authentication, and keeps the dashboard
on the head. `tests/test_ray_up.py` runs cluster/local.yaml for real."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
GPU_NODE_RESOURCE = "rayk_gpu_node"


def _ray_requirement() -> str:
    """The Ray requirement pinned in pyproject.toml's dependencies, e.g. ``ray[default]==2.60.0``."""
    pins = re.findall(r'"(ray(?:\[[^\]]*\])?==[^"]+)"', (REPO / "pyproject.toml").read_text())
    assert len(pins) == 1, f"expected one pinned ray dependency in pyproject.toml, found {pins}"
    return pins[0]


CPU_WHEEL_INDEX = "https://download.pytorch.org/whl/cpu"


def _cpu_torch_requirement() -> str:
    """The torch a machine without a GPU installs: the one the README's test command (.ci/run) names."""
    (pin,) = re.findall(r"torch==[\w.+]+", (REPO / ".ci" / "run").read_text().splitlines()[-1])
    return pin


def _prepared(path: Path) -> dict:
    return prepare_config(yaml.safe_load(path.read_text()))


def _ray_start_resources(commands: list[str]) -> dict:
    """The custom resources a node's `ray start` declares (its ``--resources`` JSON)."""
    for command in commands:
        words = shlex.split(command)
        if "start" in words and "ray" in words:
            for word in words:
                if word.startswith("--resources="):
                    return json.loads(word.split("=", 1)[1])
            return {}
    raise AssertionError(f"no `ray start` in {commands}")


def _nodes(config: dict) -> dict[str, dict]:
    """Per node type: its setup commands, as Ray merges them, and every resource it declares
    (in the config's ``resources`` or on its `ray start` line)."""
    nodes = {}
    for name, node_type in config["available_node_types"].items():
        is_head = name == config["head_node_type"]
        start = config["head_start_ray_commands" if is_head else "worker_start_ray_commands"]
        setup = config["head_setup_commands"] if is_head else node_type.get("worker_setup_commands", config["worker_setup_commands"])
        resources = {**node_type["resources"], **_ray_start_resources(start)}
        nodes[name] = {"head": is_head, "setup": setup, "resources": resources}
    return nodes


def _rayk_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if c.startswith("pip install") and "$HOME/rayk" in c]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_config_passes_rays_own_schema(path):
    validate_config(_prepared(path))


def test_the_schema_check_refuses_a_field_ray_does_not_have():
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    config["auth"]["ssh_port"] = 2222  # Ray's auth section has no port
    with pytest.raises(jsonschema.ValidationError, match="ssh_port"):
        validate_config(prepare_config(config))


def test_there_is_a_config_for_aws_gcp_and_machines_you_own():
    assert {p.name for p in CONFIGS} >= {"aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"}
    assert yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())["provider"].keys() >= {"head_ip", "worker_ips"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_installs_the_pinned_ray_and_this_checkout(path):
    ray_requirement = _ray_requirement()
    for name, node in _nodes(_prepared(path)).items():
        assert any(f'"{ray_requirement}"' in c for c in node["setup"]), f"{path.name} {name} does not install {ray_requirement}"
        (rayk,) = _rayk_installs(node["setup"])
        assert rayk.startswith("pip install") and " -e " in rayk, rayk
        if node["resources"].get(GPU_NODE_RESOURCE):
            assert '"$HOME/rayk[gpu]"' in rayk, f"{path.name} {name}: a GPU node needs the gpu extra"
        else:
            assert '"$HOME/rayk"' in rayk, f"{path.name} {name}: a CPU node needs no gpu extra"
            # From PyTorch's CPU index, as the README says: PyPI's torch is the CUDA build.
            cpu_torch = f"pip install {_cpu_torch_requirement()} --index-url {CPU_WHEEL_INDEX}"
            assert cpu_torch in node["setup"], f"{path.name} {name}: not the CPU torch from PyTorch's CPU index"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "local.yaml"], ids=lambda p: p.name)
def test_the_cloud_head_drives_and_every_gpu_type_is_marked(path):
    nodes = _nodes(_prepared(path))
    head = next(node for node in nodes.values() if node["head"])
    assert head["resources"].get("GPU", 0) == 0 and GPU_NODE_RESOURCE not in head["resources"]
    workers = [node for node in nodes.values() if not node["head"]]
    assert len(workers) >= 3
    for node in workers:
        assert node["resources"]["GPU"] >= 1 and node["resources"][GPU_NODE_RESOURCE] == 1


def test_every_on_prem_node_is_marked_as_a_gpu_node():
    config = _prepared(REPO / "cluster" / "local.yaml")
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert _ray_start_resources(commands) == {GPU_NODE_RESOURCE: 1}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_checkout_and_the_auth_token_are_shipped_and_token_auth_is_on(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["file_mounts"]["~/rayk"] == "."
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".git" in raw["rsync_exclude"]
    # Setup runs before any `ray start`, on every node, and each later command reads ~/.bashrc.
    assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in c for c in raw["setup_commands"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_dashboard_listens_on_the_head_only(path):
    config = _prepared(path)
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in shlex.split(head_start)
    assert not any("0.0.0.0" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"])
