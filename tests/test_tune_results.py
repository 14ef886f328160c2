"""The sweep summary from a real (local, in-process) Tune run: outcomes, the best trial, the printed table."""

from __future__ import annotations

import pytest

from dist_robust.tuning.summary import best_row, print_summary, trial_record, trial_table
from dist_robust.tuning.space import parse_space

# per epsilon: the dev accuracies a trial reports, whether it reaches its final evaluation, whether it then fails
PLANS = {0.1: ([0.50, 0.70], True, False),
         0.2: ([0.60, 0.65], False, False),  # stopped before its final evaluation
         0.3: ([0.80, 0.90], False, True),  # the highest value, then an error: never the best
         0.4: ([], False, True)}  # fails before its first report


def _trial(config):
    from ray import tune

    accs, final, fails = PLANS[config["objective.epsilon"]]
    for step, acc in enumerate(accs, 1):
        tune.report({"step": step, "dev_source_acc": acc})
    if fails:
        raise RuntimeError("worker lost\nsecond line")
    if final:
        tune.report({"step": len(accs), "dev_source_acc": accs[-1], "standard_avg": 0.4, "mlflow_run_id": "r1"})


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import tune

    tmp = tmp_path_factory.mktemp("tune")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "ray"))
    def fit(epsilons: list[float]):
        return tune.Tuner(_trial, param_space={"objective.epsilon": tune.grid_search(epsilons)},
                          tune_config=tune.TuneConfig(metric="dev_source_acc", mode="max"),
                          run_config=tune.RunConfig(storage_path=str(tmp / "results"), verbose=0,
                                                    failure_config=tune.FailureConfig(max_failures=0))).fit()

    try:
        yield {"all": fit(list(PLANS)), "none_finished": fit([0.2])}
    finally:
        ray.shutdown()


def _spec(mode: str = "max"):
    raw = {"base": {"flags": ["--model", "tiny", "--objective", "pgd"]}, "mode": mode,
           "params": {"objective.epsilon": {"type": "choice", "values": list(PLANS)}}}
    return parse_space(raw, "test", "summary")


def test_outcomes_best_trial_and_records(grid):
    spec = _spec()
    table = trial_table(grid["all"], spec)
    status = dict(zip(table["config/objective.epsilon"], table["status"]))
    assert status == {0.1: "finished", 0.2: "stopped_early", 0.3: "error", 0.4: "error"}
    best = trial_record(best_row(table, spec), spec)  # 0.70; the errored trial's 0.90 is never chosen
    assert best["config"] == {"objective.epsilon": 0.1} and best["metrics"]["dev_source_acc"] == 0.70
    assert best["status"] == "finished" and best["step"] == 2
    assert best["mlflow_run_id"] == "r1" and best["metrics"]["standard_avg"] == 0.4
    failed = [trial_record(row, spec) for _, row in table[table["status"] == "error"].iterrows()]
    assert all("RuntimeError: worker lost" in f["error"] for f in failed)
    assert sorted(f["config"]["objective.epsilon"] for f in failed) == [0.3, 0.4]
    worst = trial_record(best_row(table, _spec("min")), _spec("min"))
    assert worst["config"] == {"objective.epsilon": 0.2} and worst["status"] == "stopped_early"  # 0.65


def test_a_sweep_where_no_trial_finished(grid):
    table = trial_table(grid["none_finished"], _spec())  # (no trial reported standard_avg)
    assert list(table["status"]) == ["stopped_early"]


def test_printed_summary(grid, capsys):
    spec = _spec()
    table = trial_table(grid["all"], spec)
    print_summary(table, best_row(table, spec), spec)
    out, err = capsys.readouterr()
    assert "stopped_early" in out and "finished" in out and "objective.epsilon" in out
    assert "best trial" in out and '{"objective.epsilon": 0.1}' in out and "MLflow run r1" in out
    assert "failed:" in err and "worker lost" in err
