"""``dist-robust compare`` against a real ``mlflow server`` (and a local sqlite store for pagination).

The experiment below is logged with ``MlflowClient`` directly. Per language the seeds of a group
differ by exactly 0.02, so every group's mean is the middle seed and its sample std is 0.02:

    erm       seeds 1-3   en .90/.92/.94  de .80/.82/.84  fr .70/.72/.74  std_avg .75/.77/.79  gen .60/.62/.64
    pgd       eps .1 (seeds 1, 2) and eps .2 (seed 1), nested under the sweep run "pgd-sweep"
              en .93/.95/.91  de .85/.87/.83  fr .77/.79/.75  std_avg .81/.83/.79  gen .70/.72/.66
    gaussian  seed 1: no acc.fr (the missing-metric case)
    freelb    seed 1: no generalized_avg
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
import uuid
from dataclasses import dataclass

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from dist_robust.analysis.compare import build_table, compare_main, compare_runs
from dist_robust.analysis.compare_format import MISSING, to_csv
from dist_robust.analysis.compare_plots import log_sweep_plots
from dist_robust.analysis.mlflow_runs import PARENT_TAG, fetch_runs, open_client

LANG_METRICS = ("acc.en", "acc.de", "acc.fr", "standard_avg", "generalized_avg")
RUNS = {
    # name: (objective, seed, size, in the pgd sweep, (en, de, fr, standard_avg, generalized_avg))
    "erm-s1": ("erm", 1, None, False, (0.90, 0.80, 0.70, 0.75, 0.60)),
    "erm-s2": ("erm", 2, None, False, (0.92, 0.82, 0.72, 0.77, 0.62)),
    "erm-s3": ("erm", 3, None, False, (0.94, 0.84, 0.74, 0.79, 0.64)),
    "pgd-e0.1-s1": ("pgd", 1, 0.1, True, (0.93, 0.85, 0.77, 0.81, 0.70)),
    "pgd-e0.1-s2": ("pgd", 2, 0.1, True, (0.95, 0.87, 0.79, 0.83, 0.72)),
    "pgd-e0.2-s1": ("pgd", 1, 0.2, True, (0.91, 0.83, 0.75, 0.79, 0.66)),
    "gaussian-s1": ("gaussian", 1, 0.05, False, (0.89, 0.81, None, 0.81, 0.61)),
    "freelb-s1": ("freelb", 1, 0.1, False, (0.90, 0.86, 0.78, 0.82, None)),
}


@dataclass
class Logged:
    uri: str
    experiment: str
    ids: dict[str, str]  # run name -> run id
    parent_id: str


def _metrics(name: str) -> list[Metric]:
    objective, _, _, _, values = RUNS[name]
    now = int(time.time() * 1000)
    out = [Metric(key, v, now, 3) for key, v in zip(LANG_METRICS, values) if v is not None]
    if values[-1] is not None:  # generalized cells: the diagonal is the language's own accuracy
        accs = dict(zip(("en", "de", "fr"), values[:3]))
        out += [Metric(f"gen.{a}.{b}", accs[a] if a == b else values[-1], now, 3)
                for a in accs for b in accs if accs[a] is not None]
    for step in (1, 2, 3):
        out += [Metric("train/loss", 1.0 / step + 0.1 * (objective == "pgd"), now, step),
                Metric("dev_standard_avg", values[3] - 0.01 * (3 - step), now, step)]
    return out


def _params(name: str) -> list[Param]:
    objective, seed, size, _, _ = RUNS[name]
    params = {"objective.name": objective, "objective.epsilon": "0.1", "objective.sigma": "0.01",
              "train.seed": str(seed), "data.task": "pawsx", "data.source_language": "en"}
    if size is not None:
        params["objective.sigma" if objective == "gaussian" else "objective.epsilon"] = str(size)
    return [Param(k, v) for k, v in params.items()]


@pytest.fixture(scope="module")
def logged(mlflow_server) -> Logged:
    client = MlflowClient(mlflow_server)
    name = f"compare-{uuid.uuid4().hex[:8]}"
    exp_id = client.create_experiment(name)
    parent_id = client.create_run(exp_id, run_name="pgd-sweep", tags={"task": "pawsx"}).info.run_id
    ids = {}
    for run_name, (objective, _, _, nested, _) in RUNS.items():
        tags = {"task": "pawsx", "objective": objective, **({PARENT_TAG: parent_id} if nested else {})}
        ids[run_name] = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        client.log_batch(ids[run_name], metrics=_metrics(run_name), params=_params(run_name))
        client.set_terminated(ids[run_name])
    client.set_terminated(parent_id)
    return Logged(mlflow_server, name, ids, parent_id)


def run_cli(logged: Logged, capsys, *args: str) -> tuple[int, str, str]:
    code = compare_main(["--experiment", logged.experiment, "--mlflow-uri", logged.uri, *args])
    out, err = capsys.readouterr()
    return code, out, err


def json_rows(logged: Logged, capsys, *args: str) -> dict[str, dict]:
    code, out, err = run_cli(logged, capsys, "--format", "json", *args)
    assert code == 0, err
    return {row["label"]: row for row in json.loads(out)["rows"]}


def test_csv_has_every_run_with_its_logged_values(logged, capsys):
    code, out, err = run_cli(logged, capsys, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["run", "n", "split", "run_ids", "en", "de", "fr", "standard_avg", "generalized_avg"]
    assert {row["split"] for row in rows} == {"?"}  # these runs were logged without their evaluation split
    by_name = {row["run"]: row for row in rows}
    assert set(by_name) == set(RUNS)  # the sweep parent is left out
    assert [by_name["pgd-e0.2-s1"][k] for k in ("en", "de", "fr", "standard_avg", "generalized_avg")] == \
        ["0.910000", "0.830000", "0.750000", "0.790000", "0.660000"]
    assert by_name["gaussian-s1"]["fr"] == "" and by_name["gaussian-s1"]["de"] == "0.810000"
    assert by_name["freelb-s1"]["generalized_avg"] == ""
    assert by_name["erm-s2"]["run_ids"] == logged.ids["erm-s2"]


def test_groups_show_mean_std_and_seeds(logged, capsys):
    rows = json_rows(logged, capsys, "--group-by", "objective")
    assert list(rows) == ["erm", "freelb", "gaussian", "pgd"]
    erm, pgd = rows["erm"], rows["pgd"]
    assert erm["n"] == 3 and sorted(erm["seeds"]) == ["1", "2", "3"]
    expected = {"en": 0.92, "de": 0.82, "fr": 0.72, "standard_avg": 0.77, "generalized_avg": 0.62}
    for column, mean in expected.items():
        assert erm["values"][column]["mean"] == pytest.approx(mean, abs=1e-12)
        assert erm["values"][column]["std"] == pytest.approx(0.02, abs=1e-12)
        assert erm["values"][column]["n"] == 3
    assert pgd["values"]["en"]["mean"] == pytest.approx(0.93, abs=1e-12)
    assert pgd["values"]["generalized_avg"]["mean"] == pytest.approx(statistics.fmean([0.70, 0.72, 0.66]))
    assert pgd["values"]["generalized_avg"]["std"] == pytest.approx(statistics.stdev([0.70, 0.72, 0.66]))
    assert rows["gaussian"]["values"]["en"]["std"] is None  # one run: no spread
    assert rows["gaussian"]["values"]["fr"] == {"mean": None, "std": None, "n": 0, "delta": None}


def test_deltas_against_a_baseline_group(logged, capsys):
    rows = json_rows(logged, capsys, "--group-by", "objective", "--baseline", "erm")
    assert list(rows)[0] == "erm" and rows["erm"]["baseline"]
    pgd = rows["pgd"]["values"]
    assert pgd["en"]["delta"] == pytest.approx(0.01, abs=1e-12)
    assert pgd["fr"]["delta"] == pytest.approx(0.05, abs=1e-12)
    assert pgd["standard_avg"]["delta"] == pytest.approx(0.04, abs=1e-12)
    assert pgd["generalized_avg"]["delta"] == pytest.approx(statistics.fmean([0.70, 0.72, 0.66]) - 0.62)
    assert rows["gaussian"]["values"]["fr"]["delta"] is None
    assert rows["erm"]["values"]["en"]["delta"] is None


def test_baseline_filter_is_the_mean_of_its_runs(logged, capsys):
    code, out, err = run_cli(logged, capsys, "--format", "csv", "--baseline", "tags.objective = 'erm'")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    base = rows[0]
    assert base["baseline"] == "yes" and base["n"] == "3"
    assert (base["en"], base["en_std"], base["en_delta"]) == ("0.920000", "0.020000", "")
    by_name = {row["run"]: row for row in rows[1:]}
    assert by_name["pgd-e0.2-s1"]["en_delta"] == "-0.010000"
    assert by_name["freelb-s1"]["de_delta"] == "0.040000"
    assert by_name["erm-s1"]["en_delta"] == "-0.020000"


def test_baseline_by_run_name_and_unknown_baseline(logged, capsys):
    rows = json_rows(logged, capsys, "--baseline", "erm-s1")
    assert rows["pgd-e0.1-s2"]["values"]["de"]["delta"] == pytest.approx(0.07, abs=1e-12)
    code, _, err = run_cli(logged, capsys, "--baseline", "no-such-run")
    assert code == 2 and "matches no row ('erm-s1'" in err and "tags.objective = 'erm'" in err


@pytest.mark.parametrize("key", ["objective", "params.objective.name", "tags.objective", "params.`objective.name`"])
def test_group_by_spellings_agree(logged, capsys, key):
    rows = json_rows(logged, capsys, "--group-by", key)
    assert {label: row["n"] for label, row in rows.items()} == {"erm": 3, "freelb": 1, "gaussian": 1, "pgd": 3}


def test_group_by_two_keys(logged, capsys):
    rows = json_rows(logged, capsys, "--filter", "tags.objective = 'pgd'", "--group-by", "objective", "epsilon")
    assert {label: row["n"] for label, row in rows.items()} == {"objective=pgd epsilon=0.1": 2,
                                                                "objective=pgd epsilon=0.2": 1}


def test_text_formats_mark_missing_metrics(logged, capsys):
    code, out, _ = run_cli(logged, capsys, "--group-by", "objective", "--baseline", "erm")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("gaussian"))
    assert MISSING in line and "89.00 (-3.00)" in line
    assert "erm (baseline)" in out and "92.00 +- 2.00" in out and "93.00 +- 2.00 (+1.00)" in out
    assert f"{MISSING}: not logged" in out
    code, out, _ = run_cli(logged, capsys, "--format", "markdown", "--group-by", "objective")
    assert code == 0
    assert "| erm | 3 | 92.00 ± 2.00 |" in out
    assert f"| gaussian | 1 | 89.00 | 81.00 | {MISSING} |" in out


def test_partial_group_is_marked():
    from dist_robust.analysis.mlflow_runs import RunRecord

    records = [RunRecord("a" * 32, "a", "FINISHED", 0, {"objective.name": "pgd"}, {}, {"acc.en": 0.9}),
               RunRecord("b" * 32, "b", "FINISHED", 1, {"objective.name": "pgd"}, {}, {"acc.en": 0.8, "acc.de": 0.7})]
    text = to_csv(build_table("e", records, ["objective"]))
    assert text.splitlines()[1].endswith("0.850000,0.070711,0.700000,,,,,")
    from dist_robust.analysis.compare_format import to_text

    out = to_text(build_table("e", records, ["objective"]))
    assert "70.00*" in out and "*: mean over fewer runs" in out


def test_certified_accuracy_sits_beside_clean_accuracy():
    """Runs that were certified (``cert.<lang>``, logged by ``dist-robust certify``) get a
    certified column beside each language's clean one and the certified averages."""
    from dist_robust.analysis.compare_format import to_text
    from dist_robust.analysis.mlflow_runs import RunRecord

    params = {"objective.name": "gaussian", "data.task": "synthetic"}
    records = [RunRecord("a" * 32, "a", "FINISHED", 0, {**params, "train.seed": "1"}, {},
                         {"acc.en": 0.9, "acc.de": 0.8, "cert.en": 0.7, "cert.de": 0.5, "cert.de.r0.1": 0.5,
                          "standard_avg": 0.8, "certified_standard_avg": 0.5}),
               RunRecord("b" * 32, "b", "FINISHED", 1, {**params, "train.seed": "2"}, {},
                         {"acc.en": 0.7, "acc.de": 0.6, "cert.en": 0.5, "cert.de": 0.3, "standard_avg": 0.6,
                          "certified_standard_avg": 0.3})]
    table = build_table("e", records, ["objective"])
    assert table.columns == ["acc.en", "cert.en", "acc.de", "cert.de", "standard_avg", "generalized_avg",
                             "certified_standard_avg"]
    assert table.headers[:4] == ["en", "en cert", "de", "de cert"]
    row = table.rows[0]
    assert row.cells["cert.de"].mean == pytest.approx(0.4) and row.cells["acc.de"].mean == pytest.approx(0.7)
    assert "de cert" in to_text(table)
    plain = build_table("e", [RunRecord("c" * 32, "c", "FINISHED", 0, params, {}, {"acc.en": 0.9})], [])
    assert plain.columns == ["acc.en", "standard_avg", "generalized_avg"]  # uncertified runs: as before


def test_bad_group_by_says_what_is_accepted(logged, capsys):
    code, _, err = run_cli(logged, capsys, "--group-by", "objectiv")
    assert code == 2 and "params.<key>, tags.<key>" in err and "objective" in err
    code, _, err = run_cli(logged, capsys, "--group-by", "params.objective")
    assert code == 2 and "no run has it" in err and "params.objective.name" in err


def test_unknown_experiment_lists_the_existing_ones(logged, capsys):
    code = compare_main(["--experiment", "nope-" + uuid.uuid4().hex[:6], "--mlflow-uri", logged.uri])
    err = capsys.readouterr().err
    assert code == 2 and "unknown experiment" in err and repr(logged.experiment) in err


def test_filter_and_a_filter_matching_nothing(logged, capsys):
    rows = json_rows(logged, capsys, "--filter", "params.`objective.name` = 'pgd'")
    assert set(rows) == {"pgd-e0.1-s1", "pgd-e0.1-s2", "pgd-e0.2-s1"}
    code, _, err = run_cli(logged, capsys, "--filter", "params.objective = 'pgd'")
    assert code == 2 and "params.`objective.name` = 'pgd'" in err and "objective.name" in err


def test_runs_selects_in_the_given_order(logged, capsys):
    ids = [logged.ids["gaussian-s1"], logged.ids["erm-s1"]]
    rows = json_rows(logged, capsys, "--runs", *ids)
    assert list(rows) == ["gaussian-s1", "erm-s1"]
    code, _, err = run_cli(logged, capsys, "--runs", ids[0], "f" * 32)
    assert code == 2 and "f" * 32 in err


def test_pages_over_http_return_every_run_once(logged):
    client = open_client(logged.uri)
    exp_id = client.get_experiment_by_name(logged.experiment).experiment_id
    calls = []
    search = client.search_runs
    client.search_runs = lambda *a, **kw: calls.append(kw["page_token"]) or search(*a, **kw)
    paged = fetch_runs(client, exp_id, page_size=4)
    assert len(calls) == 3 and calls[0] is None  # 9 runs (with the sweep parent) in pages of 4
    assert sorted(r.run_id for r in paged) == sorted([*logged.ids.values(), logged.parent_id])


def test_plot_dir_writes_every_plot(logged, capsys, tmp_path):
    code, _, err = run_cli(logged, capsys, "--group-by", "objective", "--baseline", "erm", "--plot-dir", str(tmp_path))
    assert code == 0, err
    stems = {"per_language", "generalized_erm", "generalized_pgd", "generalized_diff_pgd", "sweep_standard_avg",
             "sweep_generalized_avg", "curves"}
    for stem in stems:
        for ext in ("png", "svg"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 5_000, f"{stem}.{ext}"
    assert not (tmp_path / "generalized_freelb.png").exists()  # freelb-s1 logged no generalized cells


def test_sweep_plots_are_logged_on_the_parent_run(logged):
    logged_paths = log_sweep_plots(logged.uri, logged.parent_id)
    assert logged_paths == ["plots/sweep_standard_avg.png", "plots/sweep_standard_avg.svg",
                            "plots/sweep_generalized_avg.png", "plots/sweep_generalized_avg.svg"]
    client = MlflowClient(logged.uri)
    stored = {f.path: f.file_size for f in client.list_artifacts(logged.parent_id, "plots")}
    assert set(stored) == set(logged_paths) and min(stored.values()) > 5_000


def test_baseline_outside_the_filtered_runs(logged, capsys):
    rows = json_rows(logged, capsys, "--filter", "tags.objective = 'pgd'", "--baseline", "erm-s3")
    assert list(rows)[0] == "erm-s3" and rows["erm-s3"]["baseline"]
    assert rows["pgd-e0.2-s1"]["values"]["en"]["delta"] == pytest.approx(-0.03, abs=1e-12)


def test_sweep_parents_are_left_out_unless_named(logged):
    client = open_client(logged.uri)
    table = compare_runs(client, logged.experiment, group_by=["objective"])
    assert table.parents_left_out == 1 and table.run_count == len(RUNS)
    named = compare_runs(client, logged.experiment, run_ids=[logged.parent_id])
    assert named.rows[0].label == "pgd-sweep" and named.rows[0].cells["standard_avg"].mean is None


def _insert_runs(uri: str, experiment_id: str, indices: range) -> None:
    """Finished runs written through MLflow's own ORM models in one transaction.

    ``create_run`` + ``log_batch`` cost ~25 ms a run on sqlite (13 s for 520); the same rows in one
    transaction take well under a second. The test also logs runs through the public API and
    checks both kinds read back alike.
    """
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    start = int(time.time() * 1000) - 60_000  # before the runs the test logs through the API
    rows: list = []
    for i in indices:
        run_id, objective = uuid.uuid4().hex, ("erm", "pgd")[i % 2]
        rows += [SqlRun(run_uuid=run_id, name=f"run-{i}", experiment_id=int(experiment_id), status="FINISHED",
                        start_time=start + i, end_time=start + i, lifecycle_stage="active", source_type="LOCAL",
                        source_name="", entry_point_name="", user_id="test", source_version="",
                        artifact_uri=f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts"),
                 SqlTag(key="mlflow.runName", value=f"run-{i}", run_uuid=run_id),
                 SqlTag(key="objective", value=objective, run_uuid=run_id),
                 SqlParam(key="objective.name", value=objective, run_uuid=run_id)]
        for model in (SqlMetric, SqlLatestMetric):
            rows.append(model(key="acc.en", value=0.5 + i / 10_000, timestamp=start, step=1, is_nan=False,
                              run_uuid=run_id))
    engine = create_engine(uri)
    with Session(engine) as session:
        session.add_all(rows)
        session.commit()
    engine.dispose()


def test_520_runs_in_a_local_store_come_back_page_by_page(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("many")
    _insert_runs(uri, exp_id, range(517))
    for i in range(517, 520):
        run_id = client.create_run(exp_id, run_name=f"run-{i}", tags={"objective": ("erm", "pgd")[i % 2]}).info.run_id
        client.log_batch(run_id, metrics=[Metric("acc.en", 0.5 + i / 10_000, 0, 1)],
                         params=[Param("objective.name", ("erm", "pgd")[i % 2])])
    calls = []
    search = client.search_runs
    client.search_runs = lambda *a, **kw: calls.append(kw["page_token"]) or search(*a, **kw)
    records = fetch_runs(client, exp_id, page_size=200)
    assert len(calls) == 3 and len({r.run_id for r in records}) == 520
    assert [r.name for r in records[515:]] == [f"run-{i}" for i in range(515, 520)]  # oldest first
    rows = {row.label: row for row in build_table("many", records, ["objective"]).rows}
    assert len(rows["erm"].records) == len(rows["pgd"].records) == 260
    assert rows["erm"].cells["acc.en"].mean == pytest.approx(0.5 + 259 / 10_000, abs=1e-12)  # mean of even i
    assert rows["pgd"].cells["acc.en"].mean == pytest.approx(0.5 + 260 / 10_000, abs=1e-12)
    assert compare_main(["--experiment", "many", "--mlflow-uri", uri, "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 521 and out[-1].startswith("run-519,1,")


def test_reruns_count_once_and_float_groups_are_rounded(caplog):
    from dist_robust.analysis.mlflow_runs import RunRecord

    def record(run_id, seed, eps, en, out):
        params = {"objective.name": "pgd", "objective.epsilon": eps, "train.seed": seed, "train.output_dir": out}
        return RunRecord(run_id * 32, f"r{run_id}", "FINISHED", 0, params, {}, {"acc.en": en})

    eps = "0.012076665792328151"
    reruns = [record("a", "1", eps, 0.80, "runs/a"), record("b", "1", eps, 0.80, "runs/b")]
    table = build_table("e", reruns, ["params.objective.epsilon"])
    row = table.rows[0]
    assert row.label == "0.01208"
    assert row.cells["acc.en"].n == 1 and row.cells["acc.en"].std is None  # not "n=2, +- 0.00"
    assert "are reruns: counted once" in caplog.text
    seeds = [record("a", "1", eps, 0.80, "runs/a"), record("c", "2", eps, 0.84, "runs/c")]
    cell = build_table("e", seeds, ["params.objective.epsilon"]).rows[0].cells["acc.en"]
    assert cell.n == 2 and cell.mean == pytest.approx(0.82) and cell.std == pytest.approx(0.0282842712)


def test_reruns_are_one_sample_in_every_output():
    """Seed 1 run twice and seed 2 once: n is 2 in text, CSV and JSON (no partial-row mark), the
    mean weights seed 1 once, and the generalized heatmap averages seed 1's reruns before the seeds."""
    from dist_robust.analysis.compare_format import render, to_dict
    from dist_robust.analysis.compare_plots import generalized_matrix
    from dist_robust.analysis.mlflow_runs import RunRecord

    def record(run_id, seed, en, gen_en_de, out):
        params = {"objective.name": "pgd", "train.seed": seed, "train.output_dir": out}
        metrics = {"acc.en": en, "gen.en.de": gen_en_de}
        return RunRecord(run_id * 32, f"r{run_id}", "FINISHED", 0, params, {}, metrics)

    runs = [record("a", "1", 0.80, 0.60, "runs/a"), record("b", "1", 0.80, 0.70, "runs/b"),
            record("c", "2", 0.90, 0.40, "runs/c")]
    table = build_table("e", runs, ["objective"])
    row = table.rows[0]
    assert len(row.records) == 3 and row.samples == 2
    assert row.cells["acc.en"].mean == pytest.approx(0.85)  # (0.80 + 0.90) / 2, not (0.80 + 0.80 + 0.90) / 3
    assert to_dict(table)["rows"][0]["n"] == 2
    assert next(csv.DictReader(io.StringIO(to_csv(table))))["n"] == "2"
    text = render(table, "table")
    line = next(l for l in text.splitlines() if l.startswith("pgd"))
    assert line.split()[1] == "2" and "*" not in line and "fewer runs" not in text
    # seed 1: (0.60 + 0.70) / 2 = 0.65; the mean of the seeds (0.65 + 0.40) / 2, not of the runs (0.5667)
    assert generalized_matrix(runs)["en"]["de"] == pytest.approx(0.525)


def test_rows_evaluated_on_different_splits_say_so_and_one_split_is_in_the_title():
    from dist_robust.analysis.compare_format import to_dict, to_text
    from dist_robust.analysis.mlflow_runs import RunRecord

    def record(name: str, objective: str, split: str) -> RunRecord:
        return RunRecord(name, name, "FINISHED", 0, params={"objective.name": objective, "train.seed": "1",
                                                           "data.task": "pawsx", "eval_split": split},
                         metrics={"acc.en": 0.9, "acc.de": 0.8, "standard_avg": 0.8})

    mixed = build_table("e", [record("a", "erm", "test"), record("b", "pgd", "dev")], ["params.objective.name"],
                        None, lambda f: [])
    text = to_text(mixed)
    assert "erm [test]" in text and "pgd [dev]" in text and "not comparable" in text
    assert [r["split"] for r in to_dict(mixed)["rows"]] == ["test", "dev"]
    same = build_table("e", [record("a", "erm", "dev"), record("b", "pgd", "dev")], ["params.objective.name"],
                       None, lambda f: [])
    text = to_text(same)
    assert "dev accuracy (%)" in text.splitlines()[0] and "[dev]" not in text


def test_join_puts_a_run_and_the_evaluations_of_its_model_in_one_row(caplog):
    """--join tags.method seed: a training run (en, de; generalized) and the later evaluation of its model
    on more languages (en again, fr, zh) are one sample: every accuracy, standard_avg over de, fr and zh
    (not either run's own), the training run's generalized average; the paired differences use the joined
    values; a second evaluation that disagrees on en is warned about and the training run's value kept."""
    from dist_robust.analysis.compare import add_paired
    from dist_robust.analysis.mlflow_runs import RunRecord

    def record(name, method, seed, start, **metrics):
        params = {"train.seed": str(seed), "data.source_language": "en", "objective.name": method if start < 5 else "erm",
                  "model.name": "e5" if start < 5 else f"runs/{method}-s{seed}/model"}
        return RunRecord(name * 4, name, "FINISHED", start, params, {"method": method}, metrics)

    runs = [record("t-erm-1", "erm", 1, 1, **{"acc.en": .90, "acc.de": .80, "standard_avg": .80, "generalized_avg": .6}),
            record("t-pgd-1", "pgd", 1, 2, **{"acc.en": .91, "acc.de": .83, "standard_avg": .83, "generalized_avg": .7}),
            record("t-erm-2", "erm", 2, 3, **{"acc.en": .92, "acc.de": .84, "standard_avg": .84, "generalized_avg": .6}),
            record("t-pgd-2", "pgd", 2, 4, **{"acc.en": .93, "acc.de": .84, "standard_avg": .84, "generalized_avg": .7}),
            record("x-erm-1", "erm", 1, 5, **{"acc.en": .90, "acc.fr": .70, "acc.zh": .60, "standard_avg": .65}),
            record("x-pgd-1", "pgd", 1, 6, **{"acc.en": .91, "acc.fr": .76, "acc.zh": .63, "standard_avg": .695}),
            record("x-erm-2", "erm", 2, 7, **{"acc.en": .95, "acc.fr": .72, "acc.zh": .62, "standard_avg": .67}),
            record("x-pgd-2", "pgd", 2, 8, **{"acc.en": .93, "acc.fr": .72, "acc.zh": .65, "standard_avg": .685}),
            record("no-seed", "pretrained", 1, 9, **{"acc.sw": .5})]
    del runs[-1].params["train.seed"]
    table = build_table("e", runs, ["tags.method"], "erm", lambda f: [], join=["tags.method", "seed"])
    assert "acc.en is 92.00 in t-erm-2 but 95.00 in x-erm-2" in caplog.text
    erm, pgd, alone = table.rows
    assert erm.samples == 2 and pgd.samples == 2 and alone.records == runs[-1:]  # a run without a seed stays apart
    assert set(erm.run_ids) == {"t-erm-1" * 4, "x-erm-1" * 4, "t-erm-2" * 4, "x-erm-2" * 4}
    assert [c for c in table.columns if c.startswith("acc.")] == ["acc.en", "acc.de", "acc.fr", "acc.sw", "acc.zh"]
    # seed 1: (.80 + .70 + .60) / 3 = .70, seed 2: (.84 + .72 + .62) / 3 = .7267
    assert erm.cells["standard_avg"].mean == pytest.approx((.70 + .72666667) / 2)
    assert erm.cells["acc.en"].mean == pytest.approx(.91)  # the training runs' .90 and .92
    assert pgd.cells["generalized_avg"].mean == pytest.approx(.7) and pgd.cells["acc.zh"].n == 2
    add_paired(table)
    # pgd - erm, standard_avg: seed 1 (.83 + .76 + .63) / 3 - .70 = +.04, seed 2 (.84 + .72 + .65) / 3 - .72667 = +.01
    assert table.paired["pgd"]["standard_avg"].mean == pytest.approx(.025)
    assert table.paired["pgd"]["acc.fr"].wins == 1

    # Without --join the same runs are eight separate samples, and standard_avg is each run's own.
    plain = build_table("e", runs[:-1], ["tags.method"])
    assert plain.rows[0].samples == 4 and plain.rows[0].cells["standard_avg"].mean == pytest.approx(.74)


def test_join_with_a_key_no_run_has_says_what_there_is(logged, capsys):
    code, out, err = run_cli(logged, capsys, "--join", "tags.phase", "seed")
    assert code == 2 and "--join 'tags.phase': no run has it" in err and "tags.objective" in err
    code, out, err = run_cli(logged, capsys, "--join", "nonsense")
    assert code == 2 and "--join 'nonsense': expected params.<key>, tags.<key>" in err
