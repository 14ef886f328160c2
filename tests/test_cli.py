"""The command line as a newcomer meets it: every way of setting a key means the same, errors are short."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

from dist_robust.cli import train_main
from dist_robust.run.launch import relaunch_command
from dist_robust.config.run_config import RunConfig, apply_mapping, apply_overrides
from dist_robust.run.tracking import resolve_experiment, resolve_uri
from tests.launch import REPO, TINY, launcher_env


def _parse(argv: list[str]) -> RunConfig:
    from dist_robust.config.parsing import Parser
    from dist_robust.config.parsing import add_run_arguments, config_from_args

    parser = Parser(prog="t")
    add_run_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def _four_ways(tmp_path, key: str, value: str) -> list[RunConfig]:
    """The same setting as a flag, an override, a YAML run file and a JSON run file."""
    section, name = key.split(".")
    flag = {"tracking.mlflow_uri": "--mlflow-uri", "train.resume": "--resume", "train.eval_split": "--eval-split",
            "train.lr": "--lr"}[key]
    (tmp_path / "run.yaml").write_text(f"{section}:\n  {name}: {value}\n")
    (tmp_path / "run.json").write_text(json.dumps({section: {name: value}}))
    out = [_parse([flag, value]), _parse([f"{key}={value}"]), _parse(["--config", str(tmp_path / "run.yaml")]),
           _parse(["--config", str(tmp_path / "run.json")])]
    return out


@pytest.mark.parametrize("value", ["none", "off", "NONE"])
def test_tracking_off_means_off_however_it_is_set(tmp_path, value):
    for cfg in _four_ways(tmp_path, "tracking.mlflow_uri", value):
        assert resolve_uri(cfg.tracking.mlflow_uri) is None, cfg.tracking.mlflow_uri


@pytest.mark.parametrize("key,value,expected", [("train.resume", "auto", "auto"), ("train.eval_split", "dev", "dev")])
def test_special_string_values_survive_every_source(tmp_path, key, value, expected):
    section, name = key.split(".")
    for cfg in _four_ways(tmp_path, key, value):
        assert getattr(getattr(cfg, section), name) == expected


def test_null_means_the_default_in_files_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RunConfig()
    apply_mapping(cfg, {"tracking": {"mlflow_uri": None}, "train": {"lr": None}}, "run file")
    apply_overrides(cfg, ["tracking.mlflow_uri=null", "train.lr=none"])
    assert cfg.tracking.mlflow_uri is None and cfg.train.lr is None
    assert resolve_uri(cfg.tracking.mlflow_uri) == "sqlite:///mlflow.db"


def test_mlflow_environment_conventions(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert resolve_experiment(None) == "from-env" and resolve_experiment("given") == "given"
    from dist_robust.analysis.compare import build_parser

    assert build_parser().parse_args([]).experiment == "from-env"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert resolve_experiment(None) == "dist-robust"


def test_experiments_open_on_mlflows_training_view(tmp_path):
    from mlflow import MlflowClient

    from dist_robust.run.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path}/m.db"
    MLflowTracker(uri, "fresh", "run").finish()
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("made-elsewhere")  # an experiment without the tag gets it
    MLflowTracker(uri, "made-elsewhere", "run").finish()
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_misspelled_flag_gets_a_suggestion_and_a_short_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--epsilonn", "0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 4
    assert err[-1].strip() == "--epsilonn: did you mean --epsilon?"


def test_help_is_plain_text_without_contradicting_defaults(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "(default: None)" not in text
    assert text.splitlines()[0] == "usage: dist-robust train [options] [section.key=value ...]"
    assert "(default: 600)" in " ".join(text.split())  # --max-steps still says its default


@pytest.mark.parametrize("command", ["eval", "certify"])
def test_eval_and_certify_name_themselves_in_help_and_errors(command, capsys):
    from dist_robust.cli import certify_main, eval_main

    main = {"eval": eval_main, "certify": certify_main}[command]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"usage: dist-robust {command} [options] [section.key=value ...]"
    assert "Fine-tune" not in text and "without training" in text
    with pytest.raises(SystemExit):
        main(["--epsilonn", "0.1"])
    assert f"dist-robust {command}: error: unrecognized arguments: --epsilonn" in capsys.readouterr().err


def test_nproc_per_node_relaunches_on_a_free_port():
    cmd = relaunch_command(2, ["--objective", "pgd"], 41234)
    assert cmd[1:] == ["--num_gpus", "2", "--master_port", "41234", "--no_local_rank", "--quiet", "--module",
                       "dist_robust.cli", "train", "--objective", "pgd"]
    assert "--quiet" not in relaunch_command(2, ["--verbose"], 41234)  # the launcher's own lines too, when asked
    # That the relaunched ranks really start is tested by launching them: test_default_run's
    # certification on 1 and 2 ranks goes through `dist-robust certify --nproc-per-node 2`.


def test_a_port_in_use_is_an_error_that_says_what_to_do(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = launcher_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = subprocess.run([sys.executable, "train.py", *TINY, "--max-steps", "1", "--output-dir",
                               str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"port {port} on this host is already in use" in proc.stderr
    assert "--master_port" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.launcher
def test_sigterm_closes_the_run_and_says_how_to_resume(tmp_path):
    """A scheduler's stop (SIGTERM to the job's processes, here the launch's process group) ends
    the MLflow run as KILLED rather than leaving it RUNNING for ever, and says how to continue.
    (The ``deepspeed`` command itself, on one node, dies of SIGTERM without passing it on; its
    per-node ``deepspeed.launcher.launch`` does pass it to the ranks.)"""
    import os
    import signal

    from mlflow.tracking import MlflowClient

    from tests.launch import deepspeed_command

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # --preempt-grace 0: stop at once (the default takes the stop at the next step: tests/test_preemption.py)
    cmd, _ = deepspeed_command([*TINY, "--max-steps", "100000", "--no-progress", "--mlflow-uri", uri,
                                "--experiment", "stop", "--output-dir", str(tmp_path / "run"), "--preempt-grace", "0"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "first step done" in line:
                break
        assert proc.poll() is None, "".join(seen)[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        out = "".join(seen) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "rank 0: stopped by SIGTERM. Rerun the same command with --resume auto" in out, out[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_a_command_that_succeeded_ends_its_process_group_before_exit():
    """``cli.leave`` destroys the process group after success (gloo's threads otherwise outlive the
    interpreter, pytorch/pytorch#190489) and leaves it alone after an error (other ranks may still be
    in a collective). One gloo rank in a fresh process, each way."""
    code = ("import torch.distributed as dist, sys; from dist_robust.cli import leave; "
            "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1); "
            "leave(int(sys.argv[1])); print(dist.is_initialized())")
    from dist_robust.infra.distributed import free_port

    for status, still in ((0, "False"), (1, "True")):
        out = subprocess.run([sys.executable, "-c", code.format(port=free_port()), str(status)], capture_output=True,
                             text=True, check=True, cwd=REPO).stdout.strip()
        assert out == still


def test_every_script_that_joins_a_process_group_ends_it():
    """The launched test and bench scripts follow the same rule as the commands: a script that
    starts a process group (``init_distributed``, ``init_process_group``, ``train_main``) also ends
    it, through ``leave`` or ``end_process_group``. A launched helper that left it to interpreter
    exit aborted now and then after its work was done, and failed the test that launched it."""
    joins = ("init_distributed(", "init_process_group(", "train_main(")
    ends = ("leave(", "end_process_group(")
    scripts = sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    launched = [p for p in scripts if '__name__ == "__main__"' in p.read_text(encoding="utf-8")]
    joining = [p for p in launched if any(j in p.read_text(encoding="utf-8") for j in joins)]
    assert {"engine_pair.py", "engine_runs.py", "zero_stages.py"} <= {p.name for p in joining}  # reads what it should
    missing = [p.name for p in joining if not any(e in p.read_text(encoding="utf-8") for e in ends)]
    assert not missing, f"these scripts join a process group and never end it: {missing}"


@pytest.mark.launcher
def test_a_two_rank_run_prints_only_its_own_lines_and_keeps_the_rest_in_a_log(tmp_path):
    """DeepSpeed's warnings, its op-load line, torch's FutureWarnings and transformers' progress bar go to
    <output-dir>/logs/libraries-rank<R>.log; the console holds dist-robust's log lines and its report."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dist_robust.cli", "train", *TINY, "--nproc-per-node", "2",
                           "--max-steps", "2", "--eval-steps", "2", "--output-dir", str(out)], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = re.compile(r"^(\d\d:\d\d:\d\d \[rank\d\] (INFO|WARNING) dist_robust\.|synthetic / erm: |\s+en\s+de|"
                      r"accuracy |standard_avg |generalized \(|s1 \\ s2|(en|de|fr|es|zh)\s+\d|$)")
    foreign = [line for line in (proc.stdout + proc.stderr).splitlines() if not ours.match(line)]
    assert foreign == [], foreign
    for rank in (0, 1):
        aside = (out / "logs" / f"libraries-rank{rank}.log").read_text()
        assert "Setting accelerator" in aside or "built successfully" in aside or "FutureWarning" in aside, aside
