"""cluster/ and tuning/ files: each parses, carries the keys its launcher needs, and opens with its command."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.launch import REPO

CLUSTER = REPO / "cluster"
# file -> the launch command its opening comment must give
LAUNCH = {
    "ray-aws-gpu.yaml": "ray up -y cluster/ray-aws-gpu.yaml",
    "ray-gcp-gpu.yaml": "ray up -y cluster/ray-gcp-gpu.yaml",
    "kuberay-raycluster.yaml": "kubectl apply -f cluster/kuberay-raycluster.yaml",
    "kuberay-rayjob.yaml": "kubectl apply -f cluster/kuberay-rayjob.yaml",
    "hostfile": "bash cluster/deepspeed-multinode.sh",
    "deepspeed-multinode.sh": "bash cluster/deepspeed-multinode.sh",
    "slurm-tune.sbatch": "sbatch cluster/slurm-tune.sbatch",
}


def _opening_comment(path: Path) -> str:
    """The first comment line that is not a shebang."""
    for line in path.read_text().splitlines():
        if line.startswith("#!"):
            continue
        return line
    return ""


@pytest.mark.parametrize("name", sorted(LAUNCH))
def test_file_opens_with_its_launch_command(name):
    first = _opening_comment(CLUSTER / name)
    assert first.startswith("# " + LAUNCH[name]), f"{name} opens with {first!r}"


def test_every_cluster_file_is_covered():
    assert {p.name for p in CLUSTER.iterdir()} - {"README.md"} == set(LAUNCH)


@pytest.mark.parametrize("name", ["ray-aws-gpu.yaml", "ray-gcp-gpu.yaml"])
def test_autoscaler_yaml_matches_rays_schema(name):
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / name).read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] in ("aws", "gcp")
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for t in config["available_node_types"].values() if t.get("max_workers")]
    assert workers, "no autoscaled worker type"
    assert any("dist-robust" in c or "-e" in c for c in config["setup_commands"]), "the project is not installed"
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("--address" in c for c in config["worker_start_ray_commands"])


def test_aws_and_gcp_workers_have_gpus():
    aws = yaml.safe_load((CLUSTER / "ray-aws-gpu.yaml").read_text())["available_node_types"]["gpu_worker"]
    assert re.match(r"(g|p)\d", aws["node_config"]["InstanceType"])
    gcp = yaml.safe_load((CLUSTER / "ray-gcp-gpu.yaml").read_text())["available_node_types"]["gpu_worker"]
    assert gcp["node_config"]["guestAccelerators"][0]["acceleratorCount"] >= 1


def _kuberay_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["maxReplicas"] >= group["minReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_kuberay_raycluster_manifest():
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _kuberay_cluster_spec(doc["spec"])


def test_kuberay_rayjob_manifest_runs_a_sweep():
    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["spec"]["entrypoint"].startswith("dist-robust tune --space tuning/")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    _kuberay_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_hostfile_parses_with_deepspeeds_own_parser():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(CLUSTER / "hostfile"))
    assert len(pool) >= 2 and all(slots >= 1 for slots in pool.values())


@pytest.mark.parametrize("name", ["deepspeed-multinode.sh", "slurm-tune.sbatch"])
def test_shell_scripts_parse(name):
    subprocess.run(["bash", "-n", str(CLUSTER / name)], check=True)


def test_launch_script_covers_ssh_and_per_node_launch():
    text = (CLUSTER / "deepspeed-multinode.sh").read_text()
    for flag in ("--hostfile", "--no_ssh", "--node_rank", "--master_addr", "--master_port", "train.py"):
        assert flag in text


def test_slurm_script_starts_ray_and_a_sweep():
    text = (CLUSTER / "slurm-tune.sbatch").read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M)
    assert "ray start --head" in text and "ray start --address" in text
    assert "dist-robust tune --space" in text


@pytest.mark.parametrize("path", sorted((REPO / "tuning").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid(path):
    from dist_robust.tuning.space import SpaceError, load_space

    assert _opening_comment(path).startswith(f"# dist-robust tune --space tuning/{path.name}")
    for smoke in (False, True):
        try:
            spec = load_space(str(path), smoke=smoke)
        except SpaceError as e:  # only a missing optional searcher is acceptable
            assert e.problems == ["search.type = 'optuna': needs the optuna package (pip install optuna); "
                                  "or use random or grid"], e
            continue
        assert spec.params and spec.metric


@pytest.mark.parametrize("name", ["ray-aws-gpu.yaml", "ray-gcp-gpu.yaml"])
def test_ray_dashboard_listens_on_loopback_only(name):
    """The dashboard's job-submission API runs arbitrary code: never on the head's public address."""
    spec = yaml.safe_load((CLUSTER / name).read_text())
    heads = [c for c in spec["head_start_ray_commands"] if "ray start --head" in c]
    assert heads and all("--dashboard-host=127.0.0.1" in c for c in heads)
    assert "0.0.0.0" not in (CLUSTER / name).read_text().split("head_start_ray_commands")[1]


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_head_service_stays_inside_the_cluster(name):
    spec = yaml.safe_load((CLUSTER / name).read_text())["spec"]
    head = (spec.get("rayClusterSpec") or spec)["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    text = (CLUSTER / name).read_text()
    assert "LoadBalancer" not in text and "NodePort" not in text
    assert "port-forward" in text  # and says how to reach it
