"""Read training runs back from MLflow (a remote server over HTTP or a local store) as plain records.

Queries are paginated with ``page_token`` so experiments with thousands of runs cost a handful of
requests; everything downstream (tables, plots) works on :class:`RunRecord` and never on MLflow types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dist_robust.run.tracking import resolve_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Run

PAGE_SIZE = 1000  # MLflow's own default page; the server accepts up to 50000
_IDS_PER_QUERY = 100  # run ids per ``attributes.run_id IN (...)`` clause keeps filter strings short
PARENT_TAG = "mlflow.parentRunId"


class CompareError(ValueError):
    """A comparison cannot be made as asked; the message says what was asked and what exists."""


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run: params and tags as strings, the latest value of every metric."""

    run_id: str
    name: str
    status: str
    start_time: int
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    joined: tuple[str, ...] = ()  # runs whose accuracies ``compare --join`` added to this one

    @property
    def parent_id(self) -> str | None:
        """The sweep run this run is nested under, if any."""
        return self.tags.get(PARENT_TAG)


def open_client(uri: str | None) -> MlflowClient:
    """An ``MlflowClient`` for ``uri`` (default: the same store ``dist-robust train`` logs to)."""
    from mlflow import MlflowClient

    resolved = resolve_uri(uri)
    if resolved is None:
        raise CompareError(f"tracking URI {uri!r} turns tracking off; pass --mlflow-uri "
                           "(http://host:5000, sqlite:///mlflow.db, ...) or set MLFLOW_TRACKING_URI")
    return MlflowClient(resolved)


def experiment_names(client: MlflowClient) -> list[str]:
    """Names of every active experiment in the store, page by page."""
    names, token = [], None
    while True:
        page = client.search_experiments(max_results=PAGE_SIZE, page_token=token)
        names.extend(e.name for e in page)
        token = page.token
        if not token:
            return sorted(names)


def resolve_experiment(client: MlflowClient, name: str) -> Experiment:
    """The active experiment called ``name`` (or with that id); unknown names list the existing ones."""
    exp = client.get_experiment_by_name(name)
    if exp is None and name.isdigit():
        from mlflow.exceptions import MlflowException

        try:
            exp = client.get_experiment(name)
        except MlflowException:
            exp = None
    if exp is None or exp.lifecycle_stage != "active":
        known = ", ".join(repr(n) for n in experiment_names(client)) or "none"
        raise CompareError(f"unknown experiment {name!r} at {client.tracking_uri}; experiments there: {known}")
    return exp


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str = "",
               page_size: int = PAGE_SIZE) -> list[RunRecord]:
    """Every active run matching ``filter_string`` (MLflow search syntax), oldest first."""
    records, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=page_size,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        records.extend(to_record(run) for run in page)
        token = page.token
        if not token:
            return records


def fetch_runs(client: MlflowClient, experiment_id: str, filter_string: str = "", run_ids: list[str] | None = None,
               page_size: int = PAGE_SIZE) -> list[RunRecord]:
    """The experiment's runs matching the filter, restricted to ``run_ids`` when given."""
    if not run_ids:
        return search_all(client, [experiment_id], filter_string, page_size)
    records: list[RunRecord] = []
    for start in range(0, len(run_ids), _IDS_PER_QUERY):
        chunk = run_ids[start:start + _IDS_PER_QUERY]
        clause = "attributes.run_id IN (" + ", ".join(f"'{quote(i)}'" for i in chunk) + ")"
        combined = f"{clause} AND {filter_string}" if filter_string else clause
        records.extend(search_all(client, [experiment_id], combined, page_size))
    missing = set(run_ids) - {r.run_id for r in records}
    if missing:
        raise CompareError(f"--runs: {len(missing)} run(s) not in the experiment or not matching --filter: "
                           + ", ".join(sorted(missing)))
    order = {run_id: k for k, run_id in enumerate(run_ids)}
    return sorted(records, key=lambda r: order[r.run_id])


def fetch_children(client: MlflowClient, parent_run_id: str) -> list[RunRecord]:
    """The runs nested under ``parent_run_id`` (the trials of one sweep)."""
    parent = client.get_run(parent_run_id)
    return search_all(client, [parent.info.experiment_id], f"tags.{PARENT_TAG} = '{quote(parent_run_id)}'")


def metric_histories(client: MlflowClient, run_ids: list[str], keys: list[str]) -> dict[str, dict[str, list[tuple]]]:
    """``{run_id: {key: [(step, value), ...]}}`` for every run and metric key (one request each)."""
    out: dict[str, dict[str, list[tuple]]] = {}
    for run_id in run_ids:
        out[run_id] = {}
        for key in keys:
            points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            if points:
                out[run_id][key] = points
    return out


def to_record(run: Run) -> RunRecord:
    """Plain data from an ``mlflow.entities.Run``; NaN metrics count as not logged."""
    metrics = {k: v for k, v in run.data.metrics.items() if v is not None and not math.isnan(v)}
    return RunRecord(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.info.status,
                     run.info.start_time or 0, dict(run.data.params), dict(run.data.tags), metrics)


def quote(value: str) -> str:
    """``value`` escaped for a single-quoted string in an MLflow filter."""
    return value.replace("'", "\\'")
