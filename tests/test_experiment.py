"""`dist-robust experiment`'s choices and the paired statistics `compare --paired` prints."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from dist_robust.config.run_config import ObjectiveConfig
from dist_robust.experiment import choose, parse_select, run_flags
from dist_robust.analysis.paired import paired, paired_against
from tests.launch import REPO, TINY, launcher_env, results


def test_selection_takes_best_source_dev_and_ties_go_to_the_smaller_value():
    assert choose({0.03: 0.91, 0.1: 0.95, 0.3: 0.5}) == 0.1
    assert choose({0.3: 1.0, 0.1: 1.0, 0.03: 0.99}) == 0.1


def test_select_specs_and_their_errors():
    assert parse_select(["epsilon=0.03,0.1", "synonym-prob=0.5,1"]) == {"epsilon": [0.03, 0.1],
                                                                         "synonym_prob": [0.5, 1.0]}
    with pytest.raises(ValueError, match="epsilon, sigma, synonym_prob"):
        parse_select(["alpha=0.1"])
    with pytest.raises(ValueError, match="must be numbers"):
        parse_select(["sigma=small"])


def test_extra_languages_without_an_exported_model_fail_before_any_run(tmp_path, capsys):
    from dist_robust.experiment import experiment_main

    argv = ["--experiment", "x", "--output-root", str(tmp_path / "runs"), "--extra-languages", "fr", "--",
            "--no-export-model"]
    assert experiment_main(argv) == 2
    assert "--extra-languages evaluates every run's exported model: drop --no-export-model" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra,message", [
    (["--task", "synthetic"], "pass the runs' --task xnli or --task pawsx and --model after --"),
    (["--task", "xnli", "--model", "m", "--no-export-model"], "--align measures every run's exported model"),
])
def test_align_without_what_it_measures_fails_before_any_run(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, "-m", "dist_robust.cli", "experiment", "--experiment", "x", "--output-root",
                           str(tmp_path / "runs"), "--align", "--", *extra], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_align_runs_with_the_experiments_task_model_data_and_tracking():
    from types import SimpleNamespace

    from dist_robust.experiment import align_argv

    args = SimpleNamespace(output_root="runs/x", experiment="x", align_sentences=500, mlflow_uri="sqlite:///m.db")
    argv = align_argv(args, ["--task", "pawsx", "--model", "a", "--data-dir=D", "--model", "b"])
    assert argv == ["--runs", "runs/x", "--model", "b", "--task", "pawsx", "--experiment", "x", "--max-sentences",
                    "500", "--data-dir", "D", "--mlflow-uri", "sqlite:///m.db"]


def test_chosen_values_go_to_every_method_that_has_them():
    chosen = {"epsilon": 0.2, "sigma": 0.05, "synonym_prob": 0.5}
    assert run_flags("erm", chosen) == ["--objective", "erm"]
    assert run_flags("gaussian", chosen) == ["--objective", "gaussian", "--sigma", "0.05"]
    both = run_flags("synonym+pgd", chosen)
    assert both[:4] == ["--objective", "pgd", "--augment", "synonym"]
    assert "--epsilon" in both and "--alpha" in both and both[both.index("--alpha") + 1] == "0.1"
    assert both[both.index("--synonym-prob") + 1] == "0.5"


def test_paired_statistics_against_closed_forms():
    p = paired([0.01, 0.02, 0.03, 0.04, 0.05])
    half = 2.7764451051977987 * math.sqrt(0.00025) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert p.mean == pytest.approx(0.03) and p.low == pytest.approx(0.03 - half) and p.high == pytest.approx(0.03 + half)
    assert p.wins == 5 and p.n == 5
    assert p.p == pytest.approx(2 / 2 ** 5)  # exact signed-rank: only all-positive or all-negative is as extreme
    assert paired([0.0, 0.0, 0.0]).p == 1.0
    one = paired([0.02])
    assert one.low is None and one.p is None and one.wins == 1


def test_the_paired_legend_states_the_smallest_p_its_seeds_allow():
    from dist_robust.analysis.compare_format import paired_note
    from dist_robust.analysis.compare_table import Table

    for n in (3, 5):
        diffs = [0.01 * (k + 1) for k in range(n)]  # every seed won: the most extreme sign pattern
        table = Table("e", ["standard_avg"], [], [], paired={"pgd": {"standard_avg": paired(diffs)}})
        assert f"with {n} seeds it cannot go below {paired(diffs).p:.4g})" in paired_note(table)
    assert paired_note(Table("e", [], [], [], paired={"pgd": {"x": paired([0.01])}})).endswith("(two-sided)")


class _Run:
    def __init__(self, seed, acc):
        self.params, self.metrics = {"train.seed": str(seed)}, {"acc.de": acc}


def test_runs_pair_by_seed_not_by_order():
    """Seeds 1..3 of the method against the baseline's seeds listed in another order, plus a seed
    only the baseline has: differences are taken seed by seed, the extra seed is left out."""
    method = [_Run(1, 0.80), _Run(2, 0.70), _Run(3, 0.90)]
    baseline = [_Run(3, 0.85), _Run(4, 0.10), _Run(1, 0.75), _Run(2, 0.72)]
    p = paired_against(method, baseline, ["acc.de"])["acc.de"]
    assert p.n == 3 and p.mean == pytest.approx((0.05 - 0.02 + 0.05) / 3) and p.wins == 2


def test_experiment_command_selects_on_source_dev_runs_resumes_and_summarises(tmp_path):
    """The real command, end to end on the tiny config: selection, a run, a resumed run, the summary.

    (The README's experiment, run by tests/test_docs.py, covers ERM as the paired baseline.)
    """
    root, uri = tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "dist_robust.cli", "experiment", "--experiment", "e2e", "--methods", "pgd",
           "--seeds", "1", "--select", "epsilon=0.03", "--select-seeds", "101", "--output-root", str(root),
           "--mlflow-uri", uri, "--", *TINY, "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2",
           "--no-export-model", "--log-interval", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), cwd=REPO, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # The chosen radius (not the default) reaches the PGD run, with its ascent step.
    assert json.loads((root / "selection.json").read_text())["chosen"] == {"epsilon": 0.03}
    pgd = results(root / "pgd-s1")
    assert ObjectiveConfig().epsilon != 0.03
    assert (pgd["config"]["objective"]["epsilon"], pgd["config"]["objective"]["alpha"]) == (0.03, 0.015)
    # The selection run skips the generalized matrix (it only reads source dev); the compared run has it.
    assert not results(root / "select-epsilon-0.03-s101")["generalized"]
    assert set(pgd["generalized"]) == set(pgd["per_language"])

    # Without a bar, the run's log has a progress line per step (--log-interval 0), with the step's own loss.
    lines = re.findall(r"step (\d+)/4: loss (\S+) \(mean of 1 step\(s\)\), \S+ s/step, about \d+ s left",
                       (root / "logs" / "pgd-s1.log").read_text())
    assert [int(step) for step, _ in lines] == [1, 2, 3, 4]
    assert [float(loss) for _, loss in lines] == [round(x, 4) for x in pgd["train_losses"]]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert sorted((r.data.tags["method"], r.data.tags["phase"]) for r in runs) == [
        ("pgd", "main"), ("select-epsilon-0.03", "select")]
    assert "no erm among --methods" in first.stdout and "\npgd " in first.stdout  # a summary without a baseline
    assert re.search(r"\[1/1\] select-epsilon-0.03 seed 101: \d+ s, en dev [\d.]+; about [\d.]+ (s|min) left "
                     r"\(1 run\(s\)\)", first.stdout), first.stdout  # the time left counts the main run

    # An interrupted run (its results never written) continues from its last checkpoint, and its
    # log keeps the first launch's output; selection.json is reused.
    (root / "pgd-s1" / "results.json").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), cwd=REPO, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "select-" not in again.stdout
    assert re.search(r"\[1/1\] pgd seed 1: \d+ s, en dev [\d.]+\n", again.stdout), again.stdout  # nothing left
    log = (root / "logs" / "pgd-s1.log").read_text()
    assert log.count("=== ") == 2 and "resumed from" in log
    assert results(root / "pgd-s1")["per_language"] == pgd["per_language"]


def test_progress_lines_wait_for_the_interval_then_average_the_window(caplog):
    from dist_robust.run.progress import ProgressLines

    lines = ProgressLines(seconds=3600, max_steps=4)
    with caplog.at_level("INFO", logger="dist_robust.run.progress"):
        for step, loss in enumerate([1.0, 2.0, 3.0, 6.0], start=1):
            lines.step(step, loss, elapsed=0.5 * step)
    assert [r.getMessage() for r in caplog.records] == [  # only the last step, within the hour
        "step 4/4: loss 3.0000 (mean of 4 step(s)), 1.25 s/step, about 0 s left"]


def test_the_time_left_follows_the_wall_clock_pace_not_the_last_steps(caplog, monkeypatch):
    """Steps that compute in 0.1 s but take 10 s of wall time each (evaluations, a busy machine): the
    estimate is the wall pace, steady, where the compute time alone would promise seconds."""
    from dist_robust.run import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    lines = progress.ProgressLines(seconds=0, max_steps=100, first_step=50)  # resumed at step 50
    with caplog.at_level("INFO", logger="dist_robust.run.progress"):
        for step in range(51, 55):
            clock[0] += 10.0
            lines.step(step, 1.0, elapsed=0.1)
    left = [r.getMessage().rsplit(", about ", 1)[1] for r in caplog.records]
    assert left == ["8 min left"] * 4, left  # 46-49 steps at 10 s; the compute time alone would say "5 s"
    assert "0.10 s/step" in caplog.records[-1].getMessage()


def test_extra_languages_evaluate_each_exported_model_and_repeat_its_source_accuracy(tmp_path, capsys):
    """--extra-languages: every run's exported model, reloaded in a new process, on more languages.

    The source language is evaluated again from the export: it must give the run's own accuracy,
    which a wrong model, tokenizer, split or data seed would not.
    """
    root, uri = tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "dist_robust.cli", "experiment", "--experiment", "more", "--methods", "erm",
           "--seeds", "3", "--extra-languages", "fr", "zh", "--output-root", str(root), "--mlflow-uri", uri,
           "--", *TINY, "--languages", "en", "de", "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2",
           "--log-interval", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), cwd=REPO, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    run, extra = results(root / "erm-s3"), results(root / "extra" / "erm-s3")
    assert list(run["per_language"]) == ["en", "de"] and list(extra["per_language"]) == ["en", "fr", "zh"]
    assert extra["per_language"]["en"] == run["per_language"]["en"]
    assert extra["eval_split"] == run["eval_split"] and not extra["generalized"]
    assert (extra["config"]["train"]["seed"], extra["config"]["model"]["name"]) == (3, run["model_uri"])
    assert re.search(r"\n    fr [\d.]+, zh [\d.]+ \(en [\d.]+, as the run's own\)\n", first.stdout), first.stdout
    assert "every language: each run joined with its --extra-languages (fr, zh) evaluation" in first.stdout
    summary = first.stdout.split("every language:")[1]
    assert re.search(r"\n\s*method\s+n\s+en\s+de\s+fr\s+zh\s+standard_avg", summary), summary

    # One row of every language: the training run's, the evaluation's, and standard_avg over de, fr and zh.
    from dist_robust.analysis.compare import compare_main

    assert compare_main(["--experiment", "more", "--mlflow-uri", uri, "--group-by", "tags.method", "--filter",
                         "tags.phase != 'select'", "--join", "tags.method", "seed", "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["rows"]
    values, acc = row["values"], {**extra["per_language"], **run["per_language"]}
    assert row["n"] == 1 and len(row["run_ids"]) == 2
    assert {k: v["mean"] for k, v in values.items() if not k.endswith("_avg")} == pytest.approx(acc)
    assert values["standard_avg"]["mean"] == pytest.approx((acc["de"] + acc["fr"] + acc["zh"]) / 3)
    assert values["generalized_avg"]["mean"] == pytest.approx(run["generalized_avg"])

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("more").experiment_id])
    assert sorted((r.data.tags["method"], r.data.tags["phase"]) for r in runs) == [("erm", "extra"), ("erm", "main")]

    # Done evaluations are kept, like done runs.
    again = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), cwd=REPO, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (root / "logs" / "erm-s3-extra.log").read_text().count("=== ") == 1
