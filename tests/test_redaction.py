"""Planted credentials never reach what a run or a sweep writes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from dist_robust.infra.redaction import redact, redact_tree
from tests.launch import REPO, TINY, launcher_env

SECRET = "pl4nted-S3CRET"


@pytest.mark.parametrize("text,expected", [
    (f"http://alice:{SECRET}@mlflow:5000", "http://alice:***@mlflow:5000"),
    (f"s3://b/k.tsv?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}&v=2",
     "s3://b/k.tsv?X-Amz-Credential=***&X-Amz-Signature=***&v=2"),
    (f"https://h/data.jsonl?token={SECRET}", "https://h/data.jsonl?token=***"),
    ("https://h/data.jsonl?version=3", "https://h/data.jsonl?version=3"),  # nothing secret: unchanged
    ("runs/default", "runs/default"),
    (f"sftp://bob:p@{SECRET}@host/runs", "sftp://bob:***@host/runs"),  # a password holding '@'
    (f"sftp://bob:x/{SECRET}#1@host/runs", "sftp://bob:***@host/runs"),  # ... or '/' and '#'
    (f"https://hf_{SECRET}@huggingface.co/org/m", "https://***@huggingface.co/org/m"),  # a token as the user
    (f"https://h/x?pwd={SECRET}&pass={SECRET}&code={SECRET}", "https://h/x?pwd=***&pass=***&code=***"),
    (f"https://h/cb#access_token={SECRET}&state=2", "https://h/cb#access_token=***&state=2"),
    (f"error at 'http://alice:{SECRET}@mlflow:5000/api': refused", "error at 'http://alice:***@mlflow:5000/api': refused"),
    ("s3://bucket/a@b/c.tsv", "s3://bucket/a@b/c.tsv"),  # an '@' in a path: no user part
    ("http://mlflow:5000/path@x", "http://mlflow:5000/path@x"),  # a port, then a path with '@'
])
def test_redact_keeps_the_key_and_drops_the_value(text, expected):
    assert redact(text) == expected


def test_worker_env_values_are_masked_and_keys_kept():
    tree = {"worker_env": {"HF_TOKEN": SECRET, "NCCL_DEBUG": "INFO"}, "base": {"data_dir": f"gs://b?sig={SECRET}"}}
    assert redact_tree(tree) == {"worker_env": {"HF_TOKEN": "***", "NCCL_DEBUG": "***"},
                                 "base": {"data_dir": "gs://b?sig=***"}}


@pytest.mark.launcher
def test_a_tracked_run_writes_no_credential(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    uri = mlflow_server.replace("http://", f"http://alice:{SECRET}@")
    env = launcher_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(__import__("dist_robust.infra.distributed").infra.distributed.free_port()))
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    proc = subprocess.run([sys.executable, "train.py", *flags, "--max-steps", "2", "--eval-steps", "0",
                           "--mlflow-uri", uri, "--experiment", "secrets", "--output-dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [proc.stdout, proc.stderr, *(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*.json"))]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    written.append(json.dumps(run.data.params) + json.dumps(run.data.tags))
    for name in ("results.json", "run_config.json"):
        written.append((tmp_path / name).read_text() if (tmp_path / name).exists() else
                       open(client.download_artifacts(run.info.run_id, name, str(tmp_path))).read())
    leaks = [i for i, text in enumerate(written) if SECRET in text]
    assert not leaks, f"the secret is in outputs {leaks}"
    assert run.data.params["tracking.mlflow_uri"].startswith("http://alice:***@")


def test_a_saved_sweep_holds_no_credential_and_resume_asks_for_it(tmp_path, monkeypatch):
    from dist_robust.tuning.cli import SWEEP_FILE, SpaceError, _save_sweep, _sweep
    from dist_robust.tuning.space import load_space
    from dist_robust.tuning.sweep_runs import SweepTracking

    space = tmp_path / "s.yaml"
    space.write_text("base:\n  flags: [--model, tiny, --max-steps, '6', --eval-steps, '2', --save-steps, '2']\n"
                     "params:\n  objective.epsilon: {type: choice, values: [0.1, 0.2]}\n"
                     f"worker_env: {{HF_TOKEN: {SECRET}}}\n")
    spec = load_space(str(space))
    tracking = SweepTracking(f"http://alice:{SECRET}@mlflow:5000", "exp", "1", "parent")
    args = argparse.Namespace(storage=str(tmp_path / "st"), space=None, smoke=False, name=spec.name, resume=True,
                              mlflow_uri=None)
    _save_sweep(str(tmp_path / "st" / spec.name), spec, tracking, args)
    assert SECRET not in (tmp_path / "st" / spec.name / SWEEP_FILE).read_text()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SpaceError, match="worker_env HF_TOKEN: values are never saved"):
        _sweep(args)
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the worker env comes back from this shell (or --space)
    with pytest.raises(SpaceError, match="pass --mlflow-uri again"):
        _sweep(args)
    args.mlflow_uri = f"http://alice:{SECRET}@mlflow:5000"
    resumed, _ = _sweep(args)
    assert resumed.worker_env == {"HF_TOKEN": SECRET}


def test_a_trial_s_loop_config_shows_ray_s_dashboard_no_credential():
    """Ray Train 2.60 turns train_loop_config into the JSON its dashboard serves with this very function."""
    import pickle

    from ray.train.v2._internal.state.schema import _to_json_serializable_value

    from dist_robust.config.run_config import RunConfig
    from dist_robust.infra.redaction import sealed_config, sealed_env

    cfg = RunConfig()
    cfg.tracking.mlflow_uri = f"http://alice:{SECRET}@mlflow:5000"
    loop_config = {"cfg": sealed_config(cfg), "env": sealed_env({"MLFLOW_TRACKING_TOKEN": SECRET})}
    shown = json.dumps(_to_json_serializable_value(loop_config))
    assert SECRET not in shown and "MLFLOW_TRACKING_TOKEN" in shown and "http://alice:***@mlflow:5000" in shown
    back = pickle.loads(pickle.dumps(loop_config))  # what the workers get
    assert back["cfg"].value.tracking.mlflow_uri.endswith(f"{SECRET}@mlflow:5000")
    assert back["env"].value == {"MLFLOW_TRACKING_TOKEN": SECRET}


def test_experiment_children_get_credentialed_options_from_a_private_file_not_their_argv(tmp_path):
    import argparse
    import stat

    from dist_robust.experiment import Runner

    runner = Runner(argparse.Namespace(log_dir=str(tmp_path / "logs")), [])
    plain = ["python", "-m", "dist_robust.cli", "train", "--seed", "1"]
    assert runner._private_argv(plain, "erm-s1") == plain
    secret = [*plain, "--data-dir", f"https://h/data?token={SECRET}"]
    argv = runner._private_argv(secret, "erm-s1")
    assert argv[:4] == plain[:4] and len(argv) == 5 and argv[4].startswith("@") and SECRET not in " ".join(argv)
    path = argv[4][1:]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and open(path).read().splitlines() == secret[4:]
    from dist_robust.config.parsing import Parser, add_run_arguments, config_from_args

    parser = Parser(prog="t")
    add_run_arguments(parser)
    cfg = config_from_args(parser.parse_args([f"@{path}"]))
    assert cfg.data.data_dir.endswith(SECRET) and cfg.train.seed == 1
