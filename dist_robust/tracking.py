"""Experiment tracking behind a small protocol: MLflow on rank 0, nothing elsewhere."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Protocol

from dist_robust.redaction import redact

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_dict(self, data: dict, name: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_table(self, columns: dict[str, list], name: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Used on ranks other than 0 and when tracking is disabled."""

    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_dict(self, data, name):
        pass

    def log_artifact(self, local_path, artifact_path=None):
        pass

    def log_text(self, text, name):
        pass

    def log_table(self, columns, name):
        pass

    def finish(self, status="FINISHED"):
        pass


DEFAULT_EXPERIMENT = "dist-robust"
# Experiments made here open on MLflow's model-training view (MLflow 3 otherwise opens a new one on GenAI traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def resolve_uri(uri: str | None) -> str | None:
    """The tracking URI to use, or None when tracking is off (MLflow's own $MLFLOW_TRACKING_URI is honoured)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return None if uri.lower() in ("none", "off", "") else uri


def resolve_experiment(name: str | None) -> str:
    """The experiment to log into: as given, else MLflow's own $MLFLOW_EXPERIMENT_NAME, else dist-robust."""
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created (on the model-training view) when it does not exist yet."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    if not exp.tags.get("mlflow.experimentKind"):
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


class MLflowTracker:
    """One MLflow run. ``run_id`` lets a resumed training continue the same run."""

    def __init__(self, uri: str, experiment: str, run_name: str | None, run_id: str | None = None,
                 tags: dict[str, str] | None = None):
        import mlflow

        # MLflow prints its own run link for servers, with the URI's password in it; ui_link() is ours, redacted.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._mlflow = mlflow
        self._uri = uri
        mlflow.set_tracking_uri(uri)
        self._client = mlflow.MlflowClient(uri)
        exp_id = experiment_id(self._client, experiment)
        if run_id is not None:
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self._client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
        log.info("MLflow run %s in experiment %r at %s", self.run_id, experiment, redact(uri))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        batch = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()
                 if k not in existing]
        for i in range(0, len(batch), 100):
            self._client.log_batch(self.run_id, params=batch[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 500):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def log_dict(self, data: dict, name: str) -> None:
        self._client.log_dict(self.run_id, data, name)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, local_path, artifact_path)

    def log_table(self, columns: dict[str, list], name: str) -> None:
        """A table MLflow's UI shows as a table (artifact ``name``, a .json file)."""
        self._client.log_table(self.run_id, data=columns, artifact_file=name)

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)

    def ui_link(self) -> str:
        """Where MLflow's UI shows this run, on its model-training view (a local store: once `mlflow ui` runs)."""
        run = self._client.get_run(self.run_id)
        server = self._uri.startswith(("http://", "https://"))
        base = redact(self._uri).rstrip("/") if server else "http://127.0.0.1:5000"
        link = f"{base}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}?workflowType=machine_learning"
        return link if server else f"{link} (start the UI first: mlflow ui --backend-store-uri {redact(self._uri)})"


OBJECTIVE_KNOBS = {"pgd": ("epsilon", "alpha", "adv_steps", "norm"), "freelb": ("epsilon", "alpha", "adv_steps", "norm"),
                   "gaussian": ("sigma", "noise_samples"), "erm": ()}


def describe_run(cfg, ds_config: dict, world_size: int) -> tuple[str, str]:
    """A run name a person can scan in a list, and a one-paragraph description (MLflow's run note).

    Name: ``<objective>[ <size>] <task> <model> s<seed>``, e.g. ``pgd epsilon=0.1 synthetic tiny s42``.
    """
    o = cfg.objective
    knobs = [f"{k}={getattr(o, k)}" for k in OBJECTIVE_KNOBS.get(o.name, ()) if k in ("epsilon", "sigma")]
    model = os.path.basename(cfg.model.name.rstrip("/")) or cfg.model.name
    name = " ".join([o.name, *knobs, cfg.data.task, model, f"s{cfg.train.seed}"])
    settings = ", ".join(f"{k} {getattr(o, k)}" for k in OBJECTIVE_KNOBS.get(o.name, ()))
    precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else \
        "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32"
    augment = f" with {cfg.data.augment} augmentation" if cfg.data.augment != "none" else ""
    description = (f"{o.name}{f' ({settings})' if settings else ''}{augment} on {cfg.data.task}, model {cfg.model.name}, "
                   f"seed {cfg.train.seed}: {cfg.train.max_steps} steps on {world_size} rank(s), ZeRO stage "
                   f"{ds_config.get('zero_optimization', {}).get('stage', 0)}, {precision}; outputs in "
                   f"{cfg.train.output_dir}. Accuracies are logged as fractions (0.855 = 85.5%): acc.<lang> per "
                   "language, gen.<l1>.<l2> per cell of the generalized matrix, dev_* at each evaluation.")
    return name, description


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out
