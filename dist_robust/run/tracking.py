"""Experiment tracking behind a small protocol: MLflow on rank 0, nothing elsewhere."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Protocol

from dist_robust.infra.zero import zero_stage
from dist_robust.infra.redaction import redact
from dist_robust.run.stopping import shielded

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
    def log_model(self, model_dir: str, name: str = "model") -> None: ...
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

    def log_model(self, model_dir, name="model"):
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


def access_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an MLflow server refuses this process (its credentials), or None (accepted, not a server, or away).

    One search request with the credentials MLflow's client would send (``MLFLOW_TRACKING_TOKEN``,
    else ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, else the URI's own user part), so a wrong password
    is known before training rather than after it. A server that does not answer is not a problem
    here: training goes on and its tracking waits (:class:`ResilientTracker`).
    """
    if not uri.startswith(("http://", "https://")):
        return None
    import requests
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    base = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers, auth = {}, None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user is not None:
        auth = (user, password or "")
    elif parts.username is not None:
        auth = (parts.username, parts.password or "")
    try:
        reply = requests.get(f"{base.rstrip('/')}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                             headers=headers, auth=auth, timeout=timeout_s,
                             verify=os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true")
    except requests.RequestException:
        return None
    if reply.status_code not in (401, 403):
        return None
    given = "a token (MLFLOW_TRACKING_TOKEN)" if token else f"user {(user or parts.username)!r}" \
        if (user is not None or parts.username) else "no credentials"
    return (f"MLflow at {redact(uri)} refused {given} ({reply.status_code} {reply.reason}): set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that "
            f"server with write access, or pass --mlflow-uri none to train without tracking")


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
            # a run name or description (the output dir, the model) may quote a location with its credentials
            self.run_id = self._client.create_run(exp_id, run_name=redact(run_name) if run_name else run_name,
                                                  tags={k: redact(str(v)) for k, v in (tags or {}).items()}).info.run_id
        log.info("MLflow run %s in experiment %r at %s", self.run_id, experiment, redact(uri))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        batch = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()
                 if k not in existing]
        for i in range(0, len(batch), 100):
            self._client.log_batch(self.run_id, params=batch[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 500):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def log_dict(self, data: dict, name: str) -> None:
        self._client.log_dict(self.run_id, data, name)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, local_path, artifact_path)

    def log_model(self, model_dir: str, name: str = "model") -> None:
        """The exported folder as an MLflow pyfunc (:mod:`dist_robust.model.serving`) under the run's artifact ``name``:
        ``runs:/<run id>/model`` loads, serves and registers it."""
        import mlflow.pyfunc
        import torch
        import transformers
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import ColSpec, Schema

        from dist_robust.model import serving

        signature = ModelSignature(inputs=Schema([ColSpec("string", "sentence1"), ColSpec("string", "sentence2")]),
                                   outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]))
        requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                        f"transformers=={transformers.__version__}", "pandas"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            mlflow.pyfunc.save_model(path, python_model=serving.__file__,
                                     artifacts={serving.MODEL_ARTIFACT: model_dir}, signature=signature,
                                     pip_requirements=requirements)
            self._client.log_artifacts(self.run_id, path, name)

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
        # (mlflow is on PATH only where the environment is activated: name this interpreter's)
        ui = f"{sys.executable} -m mlflow ui --backend-store-uri {redact(self._uri)}"
        return link if server else f"{link} (start the UI first: make ui, or {ui})"


JOURNAL = "mlflow-journal.jsonl"


class ResilientTracker:
    """An :class:`MLflowTracker` that outlives its server: training never waits for, or dies of, tracking.

    When a call fails (server down at start or gone mid-run, a locked sqlite file), one warning
    is logged and that call and every later one are kept, in order, in memory and in
    ``<journal_dir>/mlflow-journal.jsonl`` (artifacts copied beside it, metrics with their
    original timestamps). Every ``retry_s`` seconds the next call tries to reconnect and send
    what is kept; ``finish`` tries once more. What could not be sent stays in the journal, and
    ``dist-robust replay-tracking <journal_dir>`` sends it later. ``finish`` never raises, so
    a failing run's own error is the one the user sees.
    """

    def __init__(self, journal_dir: str, uri: str, experiment: str, run_name: str | None,
                 run_id: str | None = None, tags: dict[str, str] | None = None, retry_s: float = 30.0):
        # MLflow's own HTTP retries last minutes by default; this class does the waiting instead.
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(key, value)
        self._spec = {"uri": uri, "experiment": experiment, "run_name": run_name, "run_id": run_id,
                      "tags": tags or {}}
        self._dir, self._retry_s = journal_dir, retry_s
        self._journal = os.path.join(journal_dir, JOURNAL)
        self._pending: list[tuple[str, list]] = []
        self._inner: MLflowTracker | None = None
        self._warned, self._next_try = False, 0.0
        if os.path.exists(self._journal):  # an earlier attempt of this run (resumed) left calls behind
            header, self._pending = _read_journal(self._journal)
            self._spec["run_id"] = self._spec["run_id"] or header.get("run_id")
            log.info("%d tracking call(s) kept by an earlier attempt of this run will be sent first",
                     len(self._pending))
        with shielded():
            if self._connect() and self._pending:
                self._write_journal()
                self._flush(force=True)

    @property
    def run_id(self) -> str | None:
        return self._inner.run_id if self._inner else self._spec["run_id"]

    def log_params(self, params):
        self._call("log_params", params)

    def log_metrics(self, metrics, step):
        self._call("log_metrics", metrics, step, int(time.time() * 1000))

    def log_dict(self, data, name):
        self._call("log_dict", data, name)

    def log_artifact(self, local_path, artifact_path=None):
        self._call("log_artifact", local_path, artifact_path)

    def log_text(self, text, name):
        self._call("log_text", text, name)

    def log_table(self, columns, name):
        self._call("log_table", columns, name)

    def log_model(self, model_dir, name="model"):
        self._call("log_model", model_dir, name)  # (the folder stays in the output directory until it is sent)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("finish", status)
        with shielded():
            sent = not self._pending or self._flush(force=True)
        if not sent:
            log.warning("MLflow at %s is still unreachable: %d tracking call(s) are kept in %s; send them with: "
                        "dist-robust replay-tracking %s", redact(self._spec["uri"]), len(self._pending),
                        self._journal, self._dir)

    def ui_link(self) -> str:
        if self._inner is None or self._pending:
            return f"not sent yet (MLflow unreachable; kept in {self._journal})"
        return self._inner.ui_link()

    def _connect(self) -> bool:
        try:
            self._inner = MLflowTracker(**self._spec)
            return True
        except Exception as err:  # noqa: BLE001 - any failure of the tracking store
            self._outage(err)
            return False

    def _call(self, method: str, *args) -> None:
        # Shielded: a stop landing inside a store write would leave the store locked (dist_robust.run.stopping).
        with shielded():
            if self._inner is not None and not self._pending:
                try:
                    getattr(self._inner, method)(*args)
                    return
                except Exception as err:  # noqa: BLE001
                    self._outage(err)
            self._keep(method, list(args))
            self._flush()

    def _keep(self, method: str, args: list) -> None:
        if method == "log_artifact":  # the file may be temporary: keep a copy
            files = os.path.join(self._dir, "mlflow-journal-files", str(len(self._pending)))
            os.makedirs(files, exist_ok=True)
            args[0] = shutil.copy(args[0], files)
        self._pending.append((method, args))
        if os.path.exists(self._journal):
            with open(self._journal, "a", encoding="utf-8") as f:
                f.write(json.dumps({"call": method, "args": args}, default=str) + "\n")
        else:
            self._write_journal()

    def _write_journal(self) -> None:
        """The run to log into (its id once it exists) and every call not sent yet, in order."""
        os.makedirs(self._dir, exist_ok=True)
        spec = {**self._spec, "uri": redact(self._spec["uri"]), "run_id": self.run_id}
        tmp = f"{self._journal}.tmp"
        # only its owner reads the journal: its calls carry the run's params, which may name private locations
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            f.write(json.dumps({"run": spec}) + "\n")
            for method, args in self._pending:
                f.write(json.dumps({"call": method, "args": args}, default=str) + "\n")
        os.replace(tmp, self._journal)

    def _flush(self, force: bool = False) -> bool:
        if not force and time.monotonic() < self._next_try:
            return False
        if self._inner is None:
            if not self._connect():
                return False
            self._write_journal()  # the run exists now: a replay must log into it
        sent = 0
        while self._pending:
            method, args = self._pending[0]
            try:
                getattr(self._inner, method)(*args)
            except Exception as err:  # noqa: BLE001
                self._outage(err)
                if sent:
                    self._write_journal()  # what was sent must not be sent twice by a replay
                return False
            self._pending.pop(0)
            sent += 1
        _remove_journal(self._dir)
        if sent:
            log.warning("MLflow at %s is reachable again: %d kept tracking call(s) sent", redact(self._spec["uri"]),
                        sent)
        return True

    def _outage(self, err: Exception) -> None:
        self._next_try = time.monotonic() + self._retry_s
        if not self._warned:
            self._warned = True
            reason = redact(str(err).strip().splitlines()[0][:300]) if str(err).strip() else type(err).__name__
            log.warning("MLflow at %s is unreachable (%s): training goes on; tracking calls are kept in %s and "
                        "sent when it is back (retried every %.0f s)", redact(self._spec["uri"]), reason,
                        self._journal, self._retry_s)


def _remove_journal(journal_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(journal_dir, JOURNAL))
    shutil.rmtree(os.path.join(journal_dir, "mlflow-journal-files"), ignore_errors=True)


class JournalError(ValueError):
    """A tracking journal that is not one this module wrote: unreadable, or naming calls or files it never would."""


_JOURNAL_CALLS = ("log_params", "log_metrics", "log_dict", "log_artifact", "log_text", "log_table", "log_model",
                  "finish")
_JOURNAL_SPEC = ("uri", "experiment", "run_name", "run_id", "tags")


def _read_journal(path: str) -> tuple[dict, list[tuple[str, list]]]:
    """The run spec and the kept calls of a journal, checked: only the tracker's own calls, and artifacts
    only from the journal's own files folder (a journal names files to upload: never any file elsewhere)."""
    files = os.path.realpath(os.path.join(os.path.dirname(path), "mlflow-journal-files"))
    try:
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        spec, calls = lines[0]["run"], [(e["call"], e["args"]) for e in lines[1:]]
        if not isinstance(spec, dict) or set(spec) - set(_JOURNAL_SPEC):
            raise ValueError(f"unexpected run fields {sorted(set(spec) - set(_JOURNAL_SPEC))}")
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise JournalError(f"{path} is not a readable tracking journal ({err})") from None
    for method, args in calls:
        if method not in _JOURNAL_CALLS or not isinstance(args, list):
            raise JournalError(f"{path} holds a call {str(method)[:40]!r} that a tracking journal never does; "
                               f"nothing was sent")
        if method in ("log_artifact", "log_model"):  # files of the journal's own folder, or its run's model
            own = files if method == "log_artifact" else os.path.realpath(os.path.dirname(path))
            real = os.path.realpath(str(args[0])) if args else ""
            if os.path.commonpath([own, real or "/"]) != own:
                raise JournalError(f"{path} names the artifact {str(args[0])[:200]!r}, outside its own "
                                   f"{own}; nothing was sent")
    return spec, calls


def replay_journal(journal_dir: str, uri: str | None = None) -> tuple[str, int]:
    """Send the calls kept in ``journal_dir``'s journal to MLflow; returns (run id, calls sent).

    ``uri`` overrides the journal's (which is stored without credentials). Raises on failure
    and leaves the journal in place, so it can be replayed again.
    """
    path = os.path.join(journal_dir, JOURNAL)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tracking journal (nothing was left to send)")
    header, calls = _read_journal(path)
    tracker = MLflowTracker(**{**header, **({"uri": uri} if uri else {})})
    for method, args in calls:
        getattr(tracker, method)(*args)
    _remove_journal(journal_dir)
    return tracker.run_id, len(calls)


OBJECTIVE_KNOBS = {"pgd": ("epsilon", "alpha", "adv_steps", "norm"), "freelb": ("epsilon", "alpha", "adv_steps", "norm"),
                   "gaussian": ("sigma", "noise_samples"), "erm": (),
                   "smart": ("epsilon", "alpha", "adv_steps", "smart_lambda", "noise_type", "noise_scale")}


def describe_run(cfg, ds_config: dict, world_size: int) -> tuple[str, str]:
    """A run name a person can scan in a list, and a one-paragraph description (MLflow's run note).

    Name: ``<objective>[ <size>] <task> <model> s<seed>``, e.g. ``pgd epsilon=0.01 synthetic tiny s42``.
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
                   f"{zero_stage(ds_config)}, {precision}; outputs in "
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
