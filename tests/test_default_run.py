"""The embedded default, exactly as the README runs it: no flags beyond the ds_config."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from dist_robust.data.synthetic import LANGUAGES
from tests.launch import REPO, TINY, deepspeed, launcher_env

pytestmark = pytest.mark.launcher


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("default")
    env = launcher_env()
    env.pop("MLFLOW_TRACKING_URI")  # the default local store, as a user gets it
    proc = deepspeed(["--deepspeed", str(REPO / "ds_configs" / "zero2.json")], nproc=0, env=env,
                     script=str(REPO / "train.py"), cwd=cwd)
    return cwd, proc


def test_default_run_learns_and_reports(default_run):
    cwd, proc = default_run
    res = json.loads((cwd / "runs" / "default" / "results.json").read_text())
    assert res["task"] == "synthetic" and res["objective"] == "erm"
    assert res["config"]["world_size"] == 1
    assert res["config"]["ds_config"]["zero_optimization"]["stage"] == 2
    assert len(res["train_losses"]) == res["config"]["train"]["max_steps"] == 600
    assert sum(res["train_losses"][-20:]) / 20 < sum(res["train_losses"][:20]) / 20 - 0.2  # it learned
    per = res["per_language"]
    assert list(per) == list(LANGUAGES)
    assert per["en"] > 0.65  # three classes: chance is about 0.33-0.5
    assert per["de"] > 0.5  # German shares most words with English and transfers
    targets = [per[lang] for lang in LANGUAGES if lang != "en"]
    assert res["standard_avg"] == pytest.approx(sum(targets) / len(targets))
    off = [res["generalized"][a][b] for a in LANGUAGES for b in LANGUAGES if a != b]
    assert res["generalized_avg"] == pytest.approx(sum(off) / len(off))
    for lang in LANGUAGES:  # the diagonal of the matrix is the per-language set itself
        assert res["generalized"][lang][lang] == pytest.approx(per[lang])
    # The table and matrix are printed for the user.
    assert "generalized (sentence1 language x sentence2 language)" in proc.stdout
    assert "standard_avg" in proc.stdout
    assert (cwd / "runs" / "default" / "model" / "model.safetensors").exists()
    assert (cwd / "runs" / "default" / "generalized.csv").read_text().startswith("s1_lang,en,de,fr,es,zh")


def test_readme_shows_what_the_default_run_prints(default_run):
    """The quick start's table and matrix are this run's output: the same lines, labels and layout,
    and the same numbers to within what the CPU changes. Bit for bit they depend on the vector unit
    (kernels for AVX2 and for AVX-512 sum in different orders, and 600 steps carry the difference
    on), so a machine with another CPU may select another step and land a few points away; a wrong
    table, a swapped matrix or a model that did not learn is much further off than that."""
    _, proc = default_run
    readme = (REPO / "README.md").read_text()
    start = readme.index("synthetic / erm: test accuracy of the model selected at step ")
    lines = readme[start:readme.index("```", start)].strip().splitlines()
    printed = proc.stdout[proc.stdout.index("synthetic / erm: test accuracy"):].splitlines()[:len(lines)]
    number = re.compile(r"\d+(?:\.\d+)?")
    assert [number.sub("#", line).split() for line in printed] == [number.sub("#", line).split() for line in lines]
    step = int(number.findall(printed[0])[0])
    assert step % 100 == 0 and 100 <= step <= 600, printed[0]  # an evaluation step of the default run

    def values(table: list[str]) -> list[float]:  # accuracies, averages, then the matrix row by row
        return [float(v) for line in table[1:] for v in re.findall(r"\d+\.\d+", line)]

    got, shown = values(printed), values(lines)
    assert len(got) == len(shown) == 5 + 3 + 25
    # each language and cell is 400 pairs; another CPU's run is a few points away, averages less
    assert all(abs(g - w) <= 10 for g, w in zip(got, shown)), list(zip(got, shown))
    assert all(abs(g - w) <= 5 for g, w in zip(got[5:8], shown[5:8])), list(zip(got[5:8], shown[5:8]))


def test_default_run_is_tracked_in_local_mlflow(default_run):
    import mlflow

    cwd, _ = default_run
    client = mlflow.MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name("dist-robust")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.name"] == "erm"
    assert run.data.params["ds.zero_optimization.stage"] == "2"
    assert run.data.metrics["acc.en"] > 0.65
    assert "gen.de.zh" in run.data.metrics and "generalized_avg" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 600 and sorted(m.step for m in history) == list(range(1, 601))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "run_config.json", "generalized.csv"} <= artifacts


@pytest.mark.slow  # make test-all: ZeRO-3 loading a model directory is also tests/test_pretrained.py (CI)
def test_exported_model_fine_tunes_from_its_directory_under_zero3(default_run, tmp_path):
    """``--model DIR`` loads real weights (partitioned under ZeRO-3): the trained model's first
    loss is far below a random initialization's ~ln(3)."""
    cwd, _ = default_run
    model_dir = cwd / "runs" / "default" / "model"
    out = tmp_path / "finetune"
    deepspeed([*TINY, "--model", str(model_dir), "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
               "--max-steps", "2", "--lr", "1e-5", "--output-dir", str(out),
               "--no-export-model", "--max-length", "128"])
    res = json.loads((out / "results.json").read_text())
    assert res["train_losses"][0] < 0.8
    assert res["per_language"]["en"] > 0.65


def test_a_pretrained_directory_trains_with_dropout(default_run, tmp_path):
    """``from_pretrained`` returns a model in eval mode: training must switch dropout on, so the
    dropout rate changes the first loss (in eval mode both runs would compute the same one)."""
    cwd, _ = default_run
    losses = {}
    for rate in ("0", "0.3"):  # one process without a launcher: dropout, not launching, is the point
        out = tmp_path / f"dropout{rate}"
        proc = subprocess.run([sys.executable, "train.py", *TINY, "--model", str(cwd / "runs" / "default" / "model"),
                               "--dropout", rate, "--max-steps", "1", "--output-dir", str(out), "--no-export-model",
                               "--max-length", "128", "--no-generalized", "--max-eval-examples", "8"],
                              cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        losses[rate] = json.loads((out / "results.json").read_text())["train_losses"][0]
    assert abs(losses["0.3"] - losses["0"]) > 1e-3, losses


CERTIFY = ["--certify-examples", "12", "--certify-samples", "40", "--certify-selection", "8", "--sigma", "0.1",
           "--no-progress", "--mlflow-uri", "none"]


# synonym smoothing shards its votes with the same code as gaussian: make test-all, not CI
@pytest.mark.parametrize("method", ["gaussian", pytest.param("synonym", marks=pytest.mark.slow)])
def test_certification_of_the_default_model_is_the_same_on_1_and_2_ranks(default_run, tmp_path, method):
    """``dist-robust certify`` on the embedded default's model: every draw is seeded per
    (set, example), so 1 and 2 ranks (``--nproc-per-node 2``, the deepspeed launcher) count the
    same votes; certified accuracy never rises with the radius (the number of substituted words)."""

    cwd, _ = default_run
    model = str(cwd / "runs" / "default" / "model")
    out = {}
    for ranks in (1, 2):
        out[ranks] = tmp_path / f"ranks{ranks}"
        cmd = [sys.executable, "-m", "dist_robust.cli", "certify", "--certify", method, "--model", model,
               "--output-dir", str(out[ranks]), *CERTIFY]
        env = launcher_env()
        if ranks == 2:
            cmd += ["--nproc-per-node", "2"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (json.loads((out[r] / "results.json").read_text())["certify"] for r in (1, 2))
    assert one == two
    assert one["method"] == method and set(one["per_language"]) == set(LANGUAGES)
    assert set(one["generalized"]) == set(LANGUAGES)
    for lang, cell in one["per_language"].items():
        levels = [cell["certified"][t] for t in one["thresholds"]]
        assert levels == sorted(levels, reverse=True), (lang, levels)
        assert cell["certified"][one["thresholds"][0]] <= cell["accuracy"] <= 1 - cell["abstain"]
        assert cell["examples"] == 12
    assert one["per_language"]["en"]["accuracy"] > 0.5  # the smoothed model still knows English


def test_eval_of_exported_model_reproduces_final_accuracies(default_run, tmp_path):
    """``dist-robust eval`` on the exported model gives the training run's own numbers: the
    export holds the selected weights and the tokenizer, and evaluation is deterministic."""

    from dist_robust.infra.distributed import free_port

    cwd, _ = default_run
    trained = json.loads((cwd / "runs" / "default" / "results.json").read_text())
    env = launcher_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "dist_robust.cli", "eval", "--model",
                           str(cwd / "runs" / "default" / "model"), "--output-dir", str(out), "--no-progress",
                           "--mlflow-uri", "none"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["per_language"] == trained["per_language"]
    assert res["generalized"] == trained["generalized"]
    assert res["train_losses"] == [] and not (out / "model").exists()
