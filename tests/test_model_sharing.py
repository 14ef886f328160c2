"""Models leave the way users share them: a model card in the exported folder, and an MLflow pyfunc that
MLflow loads, registers and serves, labelling sentence pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from tests.launch import REPO, TINY, launcher_env, results

PAIRS = {"sentence1": ["a small test sentence", "another one here"], "sentence2": ["one more", "and the last"]}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    proc = subprocess.run([sys.executable, "train.py", *flags, "--max-steps", "4", "--eval-steps", "2", "--mlflow-uri",
                           uri, "--experiment", "share", "--output-dir", str(root / "run")], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("share").experiment_id])
    return root, uri, run.info.run_id


def test_the_exported_folder_carries_a_model_card_with_the_run_s_numbers(tracked_run):
    root, _, _ = tracked_run
    res = results(root / "run")
    card = (root / "run" / "model" / "README.md").read_text()
    assert card.startswith("---\nlanguage: [en, de, fr, es, zh]\nlibrary_name: transformers\n")
    assert "pipeline_tag: text-classification" in card and "base_model: tiny" in card
    for lang, acc in res["per_language"].items():
        assert f"| {lang}{' (trained on)' if lang == 'en' else ''} | {100 * acc:.2f} |" in card
    assert f"standard avg {100 * res['standard_avg']:.2f}" in card and f"seed {res['config']['train']['seed']}" in card
    assert "python train.py --model tiny" in card and res["command"] in card
    assert "Labels: " in card


def test_mlflow_loads_the_logged_model_and_it_labels_pairs_as_the_folder_does(tracked_run):
    import mlflow.pyfunc
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, uri, run_id = tracked_run
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    got = model.predict(pd.DataFrame(PAIRS))
    folder = root / "run" / "model"
    tok, clf = AutoTokenizer.from_pretrained(folder), AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        logits = clf(**tok(PAIRS["sentence1"], PAIRS["sentence2"], padding=True, return_tensors="pt")).logits
    assert list(got["label"]) == [clf.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert all(0 < s <= 1 for s in got["score"])
    assert model.metadata.get_input_schema().input_names() == ["sentence1", "sentence2"]


@pytest.mark.launcher
def test_mlflow_models_serve_classifies_a_pair_over_http(tracked_run):
    from dist_robust.infra.distributed import free_port

    root, uri, run_id = tracked_run
    port = free_port()
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow, "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)],
                              env={**launcher_env(), "MLFLOW_TRACKING_URI": uri,  # (the server runs the venv's uvicorn)
                                   "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                              json={"dataframe_split": {"columns": ["sentence1", "sentence2"],
                                                        "data": [[PAIRS["sentence1"][0], PAIRS["sentence2"][0]]]}})
        assert reply.status_code == 200, reply.text
        (prediction,) = reply.json()["predictions"]
        labels = json.loads((root / "run" / "model" / "config.json").read_text())["id2label"].values()
        assert prediction["label"] in labels and 0 < prediction["score"] <= 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
