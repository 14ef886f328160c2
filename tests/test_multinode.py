"""Beyond one machine, on loopback: two "nodes" on 127.0.0.1 and 127.0.0.2.

* a 2-node Ray cluster (``ray.cluster_utils.Cluster``) running a PBT sweep of two trials side by
  side, each with its two Train workers on different nodes (STRICT_SPREAD), one cloned into the
  other's checkpoint at step 2;
* the same cluster preempting a trial's second node (``ray drain-node`` with a 10 s notice): the
  trial checkpoints the step it is at and its restart continues from there;
* ``cluster/deepspeed-multinode.sh`` started once per node (node ranks, rendezvous address),
  training the tiny config, each node with its own working directory as on local disks,
  crashing, and resuming there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_robust.infra.distributed import free_port
from dist_robust.run.faults import CRASH_ENV
from tests.launch import REPO, TINY, launcher_env

pytestmark = pytest.mark.launcher

NODES = ("127.0.0.1", "127.0.0.2")


def _loopback_alias_works() -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((NODES[1], 0))
        except OSError:
            return False
    return True


needs_loopback = pytest.mark.skipif(not _loopback_alias_works(), reason="127.0.0.2 is not a loopback address here")


@pytest.fixture
def two_node_cluster(tmp_path_factory, monkeypatch):
    """A Ray head on this machine's address and a second node on 127.0.0.2, 2 logical CPUs each.

    (Ray maps a 127.0.0.1 cluster address to the machine's address, so the head keeps that one.)
    """
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 * 2 ** 20})
    cluster.add_node(num_cpus=2, node_ip_address=NODES[1], object_store_memory=100 * 2 ** 20)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _pbt_space(tmp_path: Path) -> Path:
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    flags += ["--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--objective", "pgd", "--max-steps", "3",
              "--eval-steps", "2", "--save-steps", "2", "--no-export-model", "--no-generalized"]
    space = {"name": "pbt-two-nodes", "base": {"flags": flags},
             "params": {"objective.epsilon": {"type": "uniform", "low": 0.05, "high": 0.5}},
             "num_samples": 2, "workers_per_trial": 2, "placement": "STRICT_SPREAD", "max_concurrent_trials": 2,
             "scheduler": {"type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5,
                           "resample_probability": 0.0, "synch": True},
             "search": {"type": "random", "seed": 0}, "scratch_dir": str(tmp_path / "scratch")}
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(space))
    return path


@pytest.mark.slow  # make test-all; not in CI
@needs_loopback
def test_pbt_sweep_on_two_ray_nodes(two_node_cluster, tmp_path):
    """Both trials' workers span the two nodes; at step 2 PBT clones the better trial into the other."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # a local store (the other sweep test uses a server)
    env = launcher_env(RAY_AUTH_MODE="disabled", RAY_TMPDIR=os.environ["RAY_TMPDIR"])
    proc = subprocess.run([sys.executable, "-m", "dist_robust.tuning", "--space", str(_pbt_space(tmp_path)),
                           "--storage", str(tmp_path / "results"), "--mlflow-uri", uri, "--experiment", "pbt",
                           "--address", two_node_cluster.address], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # the trials' own output (where MLflow would complain) is in Ray's session logs
    workers = "".join(p.read_text(errors="replace") for p in Path(os.environ["RAY_TMPDIR"]).glob("ray/session_*/logs/**/*")
                      if p.is_file() and p.suffix in (".out", ".err", ".log"))
    assert "[rank0]" in workers  # (the search found the trainers' logs)
    assert "Changing param values is not allowed" not in log + workers
    rows = {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in (tmp_path / "results" / "pbt-two-nodes").glob("*/result.json")}
    assert len(rows) == 2
    assert all(r[-1]["num_nodes"] == 2 and "standard_avg" in r[-1] for r in rows.values())

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pbt").experiment_id])
    children = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    (clone,) = [r for r in children.values() if r.data.tags["dist_robust.generation"] == "1"]
    donor = children[clone.data.tags["dist_robust.cloned_from_run"]]
    assert donor.data.tags["ray.trial_id"] != clone.data.tags["ray.trial_id"]
    # the clone continues the donor's trajectory (its step 3 follows their step 2) with a perturbed epsilon
    assert [m.step for m in client.get_metric_history(clone.info.run_id, "train/loss")] == [3]
    assert float(clone.data.params["objective.epsilon"]) != pytest.approx(float(donor.data.params["objective.epsilon"]))
    assert clone.info.status == "FINISHED" and "standard_avg" in clone.data.metrics
    (replaced,) = [r for r in children.values() if r.data.tags["ray.trial_id"] == clone.data.tags["ray.trial_id"]
                   and r.info.run_id != clone.info.run_id]
    # the replaced segment's run: its own steps (its workers may have run on past step 2 while PBT
    # decided), and ended rather than left RUNNING
    assert [m.step for m in client.get_metric_history(replaced.info.run_id, "train/loss")][:2] == [1, 2]
    assert replaced.info.status in ("KILLED", "FINISHED")
    # each node trained in its own working directory, named after its address, holding its rank's shard
    scratch = tmp_path / "scratch" / "pbt-two-nodes"
    nodes = sorted(p.name for p in scratch.iterdir())
    assert len(nodes) == 2 and NODES[1] in nodes
    for node in nodes:
        for tag in scratch.glob(f"{node}/*/checkpoints/step-00000002"):
            if (tag.parent / ".restored-from").exists():
                continue  # the clone's copy of the donor's whole checkpoint
            shards = [f for f in os.listdir(tag) if f.endswith("optim_states.pt")]
            assert len(shards) == 1, (tag, shards)  # one rank per node: each node holds one shard


def _launch_two_nodes(tmp_path, flags: list[str], crash_at: int | None = None, tag: str = "") -> list[str]:
    """cluster/deepspeed-multinode.sh once per loopback node, each with its own --output-dir; their logs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two loopback nodes\nnode0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = []
    for rank, addr in enumerate(NODES):
        env = launcher_env(HOSTFILE=str(hostfile), NODE_RANK=str(rank), MASTER_ADDR=NODES[0], MASTER_PORT=port,
                           DS_CONFIG=str(REPO / "ds_configs" / "zero2.json"))
        if crash_at:
            env[CRASH_ENV] = str(crash_at)
        log = open(tmp_path / f"node{rank}{tag}.log", "w")
        procs.append((subprocess.Popen(["bash", str(REPO / "cluster" / "deepspeed-multinode.sh"), *flags,
                                        "--output-dir", str(tmp_path / f"node{rank}")],
                                       cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait(timeout=900)
        log.close()
    logs = [(tmp_path / f"node{r}{tag}.log").read_text() for r in (0, 1)]
    codes = [p.returncode for p, _ in procs]
    assert (codes != [0, 0]) if crash_at else (codes == [0, 0]), "\n-----\n".join(text[-3000:] for text in logs)
    return logs


@pytest.mark.slow  # make test-all; not in CI
@needs_loopback
def test_deepspeed_launch_script_on_two_loopback_nodes_with_node_local_dirs(tmp_path):
    """Each node trains in its own directory, as on machines with local disks; a crash at step 5
    is resumed by the same command on both nodes, each from its own disk."""
    flags = [*TINY, "--max-steps", "6", "--eval-steps", "0", "--save-steps", "2", "--no-export-model"]
    logs = _launch_two_nodes(tmp_path, flags, crash_at=5, tag="-crashed")
    assert "injected crash before step 5" in logs[0]
    assert "is not shared by all nodes" in logs[0]
    # each node holds a complete checkpoint of its own: model states, manifest, layout, its rank's shard
    for rank in (0, 1):
        ckpt = tmp_path / f"node{rank}" / "checkpoints"
        assert (ckpt / "latest").read_text() == "step-00000004"
        assert set(os.listdir(ckpt / "step-00000004")) == {
            "mp_rank_00_model_states.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "manifest.json",
            "layout.json"}
    logs = _launch_two_nodes(tmp_path, [*flags, "--resume", "auto"])
    assert "step-00000004 at step 4" in logs[0]  # resumed, not started over (node 1 cannot differ: collectives)
    results = json.loads((tmp_path / "node0" / "results.json").read_text())
    assert results["config"]["world_size"] == 2 and len(results["train_losses"]) == 6
    assert not (tmp_path / "node1" / "results.json").exists()  # rank 0 alone writes results
    for rank in (0, 1):  # both resumed from step 4 and saved step 6; retention kept 2 tags on each disk
        ckpt = tmp_path / f"node{rank}" / "checkpoints"
        assert (ckpt / "latest").read_text() == "step-00000006"
        assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000006"]


def _drain(cluster, node, deadline_s: int) -> None:
    """``ray drain-node`` with the preemption reason, as a cloud autoscaler does when a spot node is reclaimed."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "drain-node", "--address", cluster.address, "--node-id", node.node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                    "--deadline-remaining-seconds", str(deadline_s)], check=True, capture_output=True, text=True,
                   env=launcher_env(RAY_AUTH_MODE="disabled"), timeout=120)


@pytest.mark.slow  # make test-all; not in CI
@needs_loopback
def test_a_preempted_ray_node_loses_no_step(two_node_cluster, tmp_path):
    """A trial with a worker on each node; its second node is drained for preemption mid-run (10 s notice).

    The workers checkpoint the step they are at when Ray Train tells them, and the restart on the node
    left continues from that very step: every step before it is trained once, the steps after it twice
    (before the deadline and after the restart) with the same losses, and the trial finishes.
    """
    from mlflow import MlflowClient

    steps = 30
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    flags += ["--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--max-steps", str(steps),
              "--eval-steps", str(steps), "--save-steps", str(steps), "--no-export-model", "--no-generalized"]
    space = {"name": "preempted", "base": {"flags": flags}, "params": {"train.seed": {"type": "grid", "values": [1]}},
             "workers_per_trial": 2, "placement": "SPREAD", "max_failures": 0, "scheduler": {"type": "fifo"},
             "scratch_dir": str(tmp_path / "scratch"), "worker_env": {"DIST_ROBUST_STEP_SECONDS": "1"}}
    (tmp_path / "space.yaml").write_text(json.dumps(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = launcher_env(RAY_AUTH_MODE="disabled", RAY_TMPDIR=os.environ["RAY_TMPDIR"])
    with open(tmp_path / "sweep.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dist_robust.tuning", "--space", str(tmp_path / "space.yaml"),
                                 "--storage", str(tmp_path / "results"), "--mlflow-uri", uri, "--experiment", "pre",
                                 "--address", two_node_cluster.address], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        client = MlflowClient(uri)

        def trained(n: int) -> bool:
            exp = client.get_experiment_by_name("pre") if (tmp_path / "mlflow.db").exists() else None
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return any(len(client.get_metric_history(r.info.run_id, "train/loss")) >= n for r in runs
                       if "mlflow.parentRunId" in r.data.tags)

        deadline = time.monotonic() + 900
        while not trained(3):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()[-4000:]
            time.sleep(1)
        (node,) = two_node_cluster.worker_nodes
        _drain(two_node_cluster, node, deadline_s=10)
        assert proc.wait(timeout=900) == 0, (tmp_path / "sweep.log").read_text()[-6000:]

    workers = "".join(p.read_text(errors="replace") for p in Path(os.environ["RAY_TMPDIR"]).glob("ray/session_*/logs/**/*")
                      if p.is_file() and p.suffix in (".out", ".err", ".log"))
    noticed = re.search(r"being preempted \(in \d+ s, ranks \[\d\]\): checkpointing step (\d+) now", workers)
    assert noticed, workers[-6000:]
    at = int(noticed.group(1))
    assert 3 <= at < steps
    assert re.search(rf"resumed from \S+/step-{at:08d} at step {at}\b", workers), workers[-6000:]
    exp = client.get_experiment_by_name("pre")
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED"
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(child.info.run_id, "train/loss"):
        losses.setdefault(m.step, []).append(m.value)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(len(losses[s]) == 1 for s in range(1, at + 1)), losses  # no step before the notice is trained again
    again = [s for s in losses if len(losses[s]) == 2]
    assert again and min(again) == at + 1, losses  # the restart took up at the step after the notice
    for s in again:
        assert losses[s][0] == pytest.approx(losses[s][1], rel=1e-6, abs=1e-7), (s, losses[s])
