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
    doc = next(yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _kuberay_cluster_spec(doc["spec"])


def test_kuberay_rayjob_manifest_runs_a_sweep():
    doc = next(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
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
    spec = next(yaml.safe_load_all((CLUSTER / name).read_text()))["spec"]
    head = (spec.get("rayClusterSpec") or spec)["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    text = (CLUSTER / name).read_text()
    assert "LoadBalancer" not in text and "NodePort" not in text
    assert "port-forward" in text  # and says how to reach it


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_clusters_take_a_token_and_only_their_own_pods(name):
    """Ray's token authentication on, and a NetworkPolicy that admits only the cluster's own pods."""
    cluster, policy = yaml.safe_load_all((CLUSTER / name).read_text())
    spec = cluster["spec"].get("rayClusterSpec") or cluster["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    own = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": own}}]}]
    label, value = next(iter(own.items()))
    assert value == {"ray.io/cluster": cluster["metadata"]["name"],
                     "ray.io/originated-from-cr-name": cluster["metadata"]["name"]}[label]


def test_slurm_cluster_takes_a_private_per_job_token():
    text = (CLUSTER / "slurm-tune.sbatch").read_text()
    setup = text[:text.index("ray start --head")]
    assert "export RAY_AUTH_MODE=token" in setup and "export RAY_AUTH_TOKEN_PATH=" in setup
    assert "umask 077" in setup and 'chmod 600 "$RAY_AUTH_TOKEN_PATH"' in setup and "secrets.token_hex" in setup


@pytest.mark.slow
def test_a_ray_head_started_as_the_slurm_script_does_refuses_a_driver_without_the_token(tmp_path):
    """Ray 2.60's token authentication, configured the way slurm-tune.sbatch configures it."""
    import os
    import secrets
    import sys

    from dist_robust.infra.distributed import free_port

    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        probe = "import ray; ray.init(address='127.0.0.1:{port}'); print(ray.cluster_resources()['CPU'])"
        with_token = subprocess.run([sys.executable, "-c", probe.format(port=port)], env=env, capture_output=True,
                                    text=True, timeout=180)
        assert with_token.returncode == 0 and with_token.stdout.strip().endswith("1.0"), with_token.stderr[-2000:]
        without = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}  # someone else on the network
        refused = subprocess.run([sys.executable, "-c", probe.format(port=port)], env=without, capture_output=True,
                                 text=True, timeout=180)
        assert refused.returncode != 0, refused.stdout
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
