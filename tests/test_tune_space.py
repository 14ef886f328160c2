"""Sweep pieces that need no Ray cluster: sweep-file checks, segments, shard staging, restore, MLflow runs."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from dist_robust.tuning.space import SpaceError, load_space
from dist_robust.tuning.trial import choose_segment
from dist_robust.tuning.worker import RESTORED, assign_uploads, checkpoint_files, restore_checkpoint, stage_node_files
from tests.launch import REPO


def _space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


GOOD = """\
base:
  flags: [--model, tiny, --objective, pgd, --max-steps, "6", --eval-steps, "2", --save-steps, "2"]
params:
  objective.epsilon: {type: loguniform, low: 0.01, high: 1.0}
"""


def test_good_space_loads_with_defaults(tmp_path):
    spec = load_space(_space(tmp_path, GOOD))
    assert spec.name == "space"  # the file's stem
    assert spec.base.objective.name == "pgd" and spec.base.train.max_steps == 6
    assert spec.scheduler == {"type": "asha", "grace_period": 2, "reduction_factor": 2}
    assert spec.metric == "dev_source_acc" and spec.mode == "max" and spec.zero_shot is True


def test_every_problem_is_named_with_key_value_and_accepted_values(tmp_path):
    bad = """\
    base:
      flags: [--model, tiny, --max-steps, "6", --eval-steps, "2", --save-steps, "3", --output-dir, /x]
    params:
      objective.epsilon: {type: loguniform, low: 0.0, high: 1.0}
      objective.alpha: {type: uniform, low: 0.5, high: 0.1}
      objective.adv_steps: {type: uniform, low: 1, high: 3}
      objective.epsilonn: {type: uniform, low: 0.1, high: 0.2}
      data.synonym_prob: {type: uniform, low: 0.5, high: 1.5}
      train.lr: {type: gaussian, low: 1, high: 2}
    metric: generalized_avg
    scheduler: {type: pbt, perturbation_interval: 2, mutate: [train.seed]}
    search: {type: bayes}
    workers: 2
    """
    with pytest.raises(SpaceError) as err:
        load_space(_space(tmp_path, bad))
    msg = str(err.value)
    for expected in [
        "unknown key 'workers'; accepted: name, ",
        "params.objective.epsilon.low = 0.0: loguniform needs low > 0",
        "params.objective.alpha: low (0.5) must be below high (0.1)",
        "params.objective.adv_steps (int) = uniform: gives non-integers; use randint",
        "params.objective.epsilonn: unknown config key",
        "params.train.lr.type = 'gaussian': accepted types: uniform, loguniform",
        "search.type = 'bayes': accepted: random, grid, optuna",
        "metric = 'generalized_avg': is only known when a trial ends, so pbt cannot use it",
        "scheduler.perturbation_interval = 2: must be a positive multiple of base train.save_steps (3)",
        "scheduler.mutate = ['train.seed']: must list searched params",
    ]:
        assert expected in msg, f"missing {expected!r} in\n{msg}"


def test_values_the_run_config_refuses_are_caught_per_param(tmp_path):
    bad = GOOD + "  data.synonym_prob: {type: uniform, low: 0.5, high: 1.5}\n"
    with pytest.raises(SpaceError) as err:
        load_space(_space(tmp_path, bad))
    expected = "params.data.synonym_prob = 1.5: data.synonym_prob (--synonym-prob) = 1.5: must be in [0, 1]"
    assert expected in str(err.value)
    assert "0.5:" not in str(err.value)  # the valid end is fine


def test_base_flags_and_sweep_owned_keys(tmp_path):
    bad = GOOD.replace("--model, tiny", "--model, tiny, --no-such-flag, --output-dir, /somewhere")
    with pytest.raises(SpaceError) as err:
        load_space(_space(tmp_path, bad))
    assert "base.flags: unrecognized arguments: --no-such-flag" in str(err.value)
    bad = GOOD.replace("--model, tiny", "--model, tiny, --output-dir, /somewhere")
    with pytest.raises(SpaceError) as err:
        load_space(_space(tmp_path, bad))
    assert "base sets train.output_dir: the sweep sets it for every trial" in str(err.value)


def test_bad_space_fails_before_ray_starts(tmp_path, capsys):
    import ray

    from dist_robust.tuning import tune_main

    code = tune_main(["--space", _space(tmp_path, GOOD + "metric: loss\n"), "--storage", str(tmp_path / "r")])
    assert code == 2
    assert "metric = 'loss': accepted: dev_source_acc, dev_standard_avg" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "r").exists()


def test_smoke_shrinks_any_space_to_the_tiny_config():
    spec = load_space(str(REPO / "tuning" / "pgd_epsilon.yaml"), smoke=True)
    assert spec.base.model.name == "tiny" and spec.base.train.max_steps == 6
    assert spec.num_samples == 2 and spec.scheduler["grace_period"] == 2
    assert spec.use_gpu == "auto" and spec.max_concurrent_trials == 0  # the file asks for GPUs; smoke runs anywhere
    assert load_space(str(REPO / "tuning" / "pgd_epsilon.yaml")).use_gpu is True


def test_set_key_keeps_field_types():
    from dist_robust.config.run_config import RunConfig, set_key

    cfg = RunConfig()
    set_key(cfg, "objective.adv_steps", 3.0)
    set_key(cfg, "objective.epsilon", 1)
    assert cfg.objective.adv_steps == 3 and isinstance(cfg.objective.adv_steps, int)
    assert isinstance(cfg.objective.epsilon, float)


def test_segments_continue_or_fork_on_pbt_clones():
    assert choose_segment("t1", {"e": 0.1}, None).name == "t1"
    own = {"trial_id": "t1", "segment": "t1", "generation": 0, "config": {"e": 0.1},
           "checkpoint": "/s/t1/checkpoint_a", "mlflow_run_id": "run-t1"}
    same = choose_segment("t1", {"e": 0.1}, own)
    assert (same.name, same.generation, same.initial_checkpoint) == ("t1", 0, None)
    # PBT: trial t2 restarted from t1's checkpoint with a mutated config -> a new segment from it
    clone = choose_segment("t2", {"e": 0.12}, own)
    assert clone.name.startswith("t2-") and clone.generation == 1
    assert clone.initial_checkpoint == "/s/t1/checkpoint_a" and clone.cloned_from_run == "run-t1"
    assert choose_segment("t2", {"e": 0.12}, own).name == clone.name  # found again after a restore
    mutated = choose_segment("t1", {"e": 0.2}, own)  # own checkpoint, new hyperparameters
    assert mutated.name != "t1" and mutated.generation == 1


ZERO3_FILES = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
               "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
ZERO2_FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
               "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def _fake_run(root: Path, files: list[str]) -> Path:
    for tag in ("step-00000004", "best-00000002", "best-00000001"):
        (root / "checkpoints" / tag).mkdir(parents=True)
        for f in files:
            (root / "checkpoints" / tag / f).write_text(f"{tag}/{f}")
    (root / "checkpoints" / "best").write_text("best-00000002")  # the pointer; best-00000001 is stale
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return root / "checkpoints" / "step-00000004"


@pytest.mark.parametrize("files", [ZERO2_FILES, ZERO3_FILES], ids=["zero2", "zero3"])
def test_the_ranks_of_a_node_upload_every_file_once_between_them(tmp_path, files):
    tag = _fake_run(tmp_path, files)
    listing = checkpoint_files(str(tag), str(tmp_path))
    shares = assign_uploads([("node0", listing), ("node0", listing)])
    expected = sorted([f"{t}/{f}" for t in ("step-00000004", "best-00000002") for f in files]
                      + ["tokenizer/tokenizer.json", "best"])
    assert sorted([*shares[0], *shares[1]]) == expected  # every file once: nothing lost, no stale best
    assert shares[0] and shares[1]  # both ranks upload, in parallel
    sizes = [sum(os.path.getsize(p) for p in share.values()) for share in shares]
    assert abs(sizes[0] - sizes[1]) <= max(os.path.getsize(p) for p in listing.values())  # balanced by bytes


def test_with_node_local_disks_files_both_nodes_hold_are_uploaded_by_the_first(tmp_path):
    """Two nodes, one rank each, each with its own disk: both hold rank 0's model states and the manifest."""
    shared = ["mp_rank_00_model_states.pt", "manifest.json"]
    node0 = checkpoint_files(str(_fake_run(tmp_path / "a", [*shared, "zero_pp_rank_0_mp_rank_00_optim_states.pt"])),
                             str(tmp_path / "a"))
    node1 = checkpoint_files(str(_fake_run(tmp_path / "b", [*shared, "zero_pp_rank_1_mp_rank_00_optim_states.pt"])),
                             str(tmp_path / "b"))
    shares = assign_uploads([("a", node0), ("b", node1)])
    assert shares[0] == node0  # node 0 uploads all it holds
    assert sorted(shares[1]) == ["best-00000002/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                 "step-00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert all(path.startswith(str(tmp_path / "b")) for path in shares[1].values())


def test_a_rank_with_nothing_to_upload_reports_no_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002" / "mp_rank_00_model_states.pt").write_text("x")
    listing = checkpoint_files(str(tmp_path / "checkpoints" / "step-00000002"), str(tmp_path))
    assert [len(share) for share in assign_uploads([("n", listing), ("n", listing)])] == [1, 0]


def test_a_single_rank_stages_the_whole_checkpoint(tmp_path):
    tag = _fake_run(tmp_path, ZERO2_FILES)
    d = Path(stage_node_files(str(tag), str(tmp_path)))
    staged = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert staged == sorted([f"{t}/{f}" for t in ("step-00000004", "best-00000002") for f in ZERO2_FILES]
                            + ["tokenizer/tokenizer.json", "best"])
    assert (d / "best").read_text() == "best-00000002"


def test_restore_rebuilds_checkpoints_latest_best_and_tokenizer(tmp_path):
    from ray.train import Checkpoint

    source = tmp_path / "ray-checkpoint"
    for name in ("step-00000004", "best-00000002", "tokenizer"):
        (source / name).mkdir(parents=True)
        (source / name / "f.pt").write_text(name)
    (source / "best").write_text("best-00000002")
    out = tmp_path / "trial"
    (out / "checkpoints" / "best-00000003").mkdir(parents=True)
    (out / "checkpoints" / "best-00000003" / "stale.pt").write_text("stale")
    (out / "checkpoints" / "best").write_text("best-00000003")
    (out / "checkpoints" / "step-00000002").mkdir()
    restore_checkpoint(Checkpoint.from_directory(str(source)), str(out))
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-00000004"
    assert sorted(p.name for p in root.iterdir()) == sorted([RESTORED, "latest", "step-00000004", "best",
                                                             "best-00000002"])
    assert (root / "best").read_text() == "best-00000002"  # the checkpoint's best, not a stale one
    assert [p.name for p in (root / "best-00000002").iterdir()] == ["f.pt"]
    assert (out / "tokenizer" / "f.pt").read_text() == "tokenizer"
    (root / "step-00000004" / "f.pt").write_text("trained on")
    restore_checkpoint(Checkpoint.from_directory(str(source)), str(out))  # same checkpoint: nothing copied
    assert (root / "step-00000004" / "f.pt").read_text() == "trained on"


def test_absolute_tracking_uris(tmp_path, monkeypatch):
    from dist_robust.tuning.sweep_runs import absolute_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("mlruns") == f"file://{tmp_path}/mlruns"
    assert absolute_uri("http://h:5000") == "http://h:5000"
    assert absolute_uri("none") is None


def test_child_runs_are_nested_and_found_again(tmp_path):
    from mlflow import MlflowClient

    from dist_robust.tuning.sweep_runs import child_run, start_parent

    spec = load_space(_space(tmp_path, GOOD))
    uri = f"sqlite:///{tmp_path}/m.db"
    tracking = start_parent(uri, "sweeps", spec)
    a = child_run(tracking, "t1", "space-t1", {"ray.trial_id": "t1"})
    assert child_run(tracking, "t1", "space-t1", {"ray.trial_id": "t1"}) == a  # a restored trial continues
    b = child_run(tracking, "t1-abc", "space-t1-g1", {"ray.trial_id": "t1"})  # a PBT segment: a new run
    assert b != a
    client = MlflowClient(uri)
    for run_id in (a, b):
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == tracking.parent_run_id
    parent = client.get_run(tracking.parent_run_id)
    assert parent.data.params["space.objective.epsilon"] == 'loguniform({"low": 0.01, "high": 1.0})'
    assert parent.data.params["sweep.metric"] == "dev_source_acc"
    assert parent.data.tags["dist_robust.zero_shot"] == "true"


@pytest.mark.parametrize("metric", ["dev_standard_avg", "dev_all_avg", "standard_avg", "generalized_avg"])
def test_target_language_selection_is_refused_unless_asked_for(tmp_path, metric):
    fifo = "scheduler: {type: fifo}\n"
    with pytest.raises(SpaceError) as err:
        load_space(_space(tmp_path, GOOD + f"metric: {metric}\n" + fifo))
    message = str(err.value)
    assert f"metric = '{metric}': selects trials with" in message and "zero_shot: false" in message
    assert "dev_source_acc" in message
    spec = load_space(_space(tmp_path, GOOD + f"metric: {metric}\nzero_shot: false\n" + fifo))
    assert spec.metric == metric and spec.zero_shot is False


def test_not_zero_shot_selection_is_labelled_in_summary_and_mlflow(tmp_path, capsys):
    from mlflow import MlflowClient

    from dist_robust.tuning.summary import print_summary
    from dist_robust.tuning.sweep_runs import start_parent

    spec = load_space(_space(tmp_path, GOOD + "metric: dev_standard_avg\nzero_shot: false\n"))
    import pandas as pd

    table = pd.DataFrame([{"trial_id": "t1", "status": "finished", "step": 6, "config/objective.epsilon": 0.1,
                           "dev_standard_avg": 0.5, "error": None}])
    print_summary(table, table.iloc[0], spec)
    assert "selection: NOT zero-shot (dev_standard_avg: target-language dev labels)" in capsys.readouterr().out
    uri = f"sqlite:///{tmp_path}/m.db"
    tags = MlflowClient(uri).get_run(start_parent(uri, "sweeps", spec).parent_run_id).data.tags
    assert tags["dist_robust.zero_shot"] == "false"
    assert tags["dist_robust.selection"].startswith("selection: NOT zero-shot")


def test_reports_without_the_metric_carry_the_last_value_instead_of_aborting_the_sweep():
    from dist_robust.tuning.trial import with_selection_metric

    last: dict = {}
    first = with_selection_metric({"step": 2, "train/loss": 0.7}, "generalized_avg", last)  # before any value
    assert first["step"] == 2 and first["generalized_avg"] != first["generalized_avg"]  # NaN
    assert with_selection_metric({"step": 4, "dev_source_acc": 0.6}, "dev_source_acc", last)["dev_source_acc"] == 0.6
    assert with_selection_metric({"step": 5}, "dev_source_acc", last) == {"step": 5, "dev_source_acc": 0.6}


def test_concurrency_defaults_to_what_the_cluster_holds(tmp_path):
    from dist_robust.tuning.search import max_concurrent_trials, use_gpu

    spec = load_space(_space(tmp_path, GOOD))  # 2 workers x 1 CPU per trial
    assert max_concurrent_trials(spec, {"CPU": 2.0}) == 1
    assert max_concurrent_trials(spec, {"CPU": 9.0}) == 4
    assert max_concurrent_trials(spec, {"CPU": 64.0, "GPU": 4.0}) == 2
    assert use_gpu(spec, {"CPU": 64.0, "GPU": 4.0}) and not use_gpu(spec, {"CPU": 64.0})
    spec.use_gpu = True
    assert use_gpu(spec, {"CPU": 1.0})  # an autoscaling cluster may have no GPU node yet
    spec.max_concurrent_trials = 3
    assert max_concurrent_trials(spec, {"CPU": 2.0}) == 3


def test_checks_change_nothing_and_short_forms_work_with_smoke(tmp_path):
    from dist_robust.tuning.space_checks import check_options, with_defaults

    spec = load_space(_space(tmp_path, GOOD + "scheduler: asha\nsearch: random\n"), smoke=True)
    assert spec.scheduler == {"type": "asha", "grace_period": 2, "reduction_factor": 2}
    assert spec.search == {"type": "random"}
    before = spec.to_dict()
    assert check_options(spec) == [] and spec.to_dict() == before
    assert with_defaults(spec).to_dict() == before  # (written out once: filling in again changes nothing)


def test_a_local_sweep_starts_ray_with_token_authentication_when_the_shell_sets_no_mode(tmp_path, tmp_path_factory):
    """What ``dist-robust tune --space F`` does up to the trials, with RAY_AUTH_MODE unset as on a fresh
    machine: the command's imports, the sweep file, then Ray. Ray reads the mode once, when imported; set
    after that, its own processes asked for a token the driver never sent (a traceback after 30 s of retries).
    A task on the cluster must run, and the token must be the one Ray made in this (temporary) home."""
    import subprocess
    import sys

    from tests.launch import launcher_env

    script = textwrap.dedent(f"""
        import argparse, os, sys
        from dist_robust.tuning import cli
        args = cli._parser().parse_args(["--space", {str(REPO / "tuning" / "smoke.yaml")!r}, "--num-cpus", "1"])
        cli._sweep(args)
        cli._init_ray(args)
        import ray
        print("mode", os.environ.get("RAY_AUTH_MODE"), "task", ray.get(ray.remote(lambda: 6 * 7).remote()))
        ray.shutdown()
    """)
    env = {k: v for k, v in launcher_env(HOME=str(tmp_path / "home"),  # (Ray's socket paths must stay short)
                                                 RAY_TMPDIR=str(tmp_path_factory.mktemp("ray"))).items()
           if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mode token task 42" in proc.stdout
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()
