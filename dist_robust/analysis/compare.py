"""Compare the runs of an MLflow experiment: a runs (or groups) x languages accuracy table.

Columns are the per-language accuracies a training run logs as ``acc.<lang>`` (source language
first), then ``standard_avg`` and ``generalized_avg``; a run that was certified (``dist-robust
certify``) adds its certified accuracy ``cert.<lang>`` beside each language and the certified
averages after them. Rows are runs, or groups of runs
(``--group-by``) shown as mean and sample standard deviation over their runs (seeds). With a
baseline every cell also carries its difference from the baseline's. A metric a run did not log
is shown as ``n/a`` rather than failing. Rendering is in :mod:`dist_robust.analysis.compare_format`.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from dist_robust.analysis.compare_table import GROUP_ALIASES, Cell, Row, Table, columns_for, rerun_groups, short_key
from dist_robust.analysis.mlflow_runs import (CompareError, RunRecord, fetch_runs, open_client, quote, resolve_experiment,
                                     search_all)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment

_FILTER_OPERATOR = re.compile(r"(=|<|>|\bLIKE\b|\bILIKE\b|\bIN\b)", re.IGNORECASE)
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def resolve_group_key(key: str, option: str = "--group-by") -> str:
    """``objective`` -> ``params.objective.name``; accepts ``params.<key>`` and ``tags.<key>``."""
    key = GROUP_ALIASES.get(key, key).replace("`", "")
    prefix, _, name = key.partition(".")
    if prefix not in ("params", "tags") or not name:
        raise CompareError(f"{option} {key!r}: expected params.<key>, tags.<key> or an alias "
                           f"({', '.join(GROUP_ALIASES)}), e.g. objective, params.objective.name, tags.objective")
    return key


def value_of(record: RunRecord, key: str) -> str | None:
    """The value of a resolved ``params.``/``tags.`` key in one run."""
    prefix, _, name = key.partition(".")
    return (record.params if prefix == "params" else record.tags).get(name)


def check_group_keys(keys: list[str], records: list[RunRecord], option: str = "--group-by") -> None:
    """Every group key must be present in some run; the error lists the params that vary."""
    for key in keys:
        if any(value_of(r, key) is not None for r in records):
            continue
        varying = sorted(k for k in {k for r in records for k in r.params}
                         if len({r.params.get(k) for r in records}) > 1)
        tags = sorted({k for r in records for k in r.tags if not k.startswith("mlflow.")})
        raise CompareError(f"{option} {key!r}: no run has it. Params that vary across these runs: "
                           f"{', '.join('params.' + k for k in varying) or 'none'}; tags: "
                           f"{', '.join('tags.' + k for k in tags) or 'none'}")


def make_row(label: str, records: list[RunRecord], columns: list[str]) -> Row:
    """Mean and sample std (n - 1) of every column over the row's distinct runs.

    Runs with the same configuration and seed are reruns, not independent samples: they are
    averaged into one value (with a warning), so two identical reruns never pass for two seeds.
    """
    distinct = rerun_groups(records)
    row = Row(label, records, len(distinct))
    reruns = [runs for runs in distinct if len(runs) > 1]
    if reruns:
        log.warning("%s: %s", label, "; ".join(
            f"{len(runs)} runs with the same config and seed {runs[0].params.get('train.seed', '?')} "
            f"({', '.join(r.name for r in runs)}) are reruns: counted once" for runs in reruns))
    for column in columns:
        values = [statistics.fmean(vs) for vs in
                  ([r.metrics[column] for r in runs if column in r.metrics] for runs in distinct) if vs]
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        row.cells[column] = Cell(mean, std, len(values))
    return row


def run_rows(records: list[RunRecord], columns: list[str]) -> list[Row]:
    """One row per run, labelled by run name (with the id's start when names repeat)."""
    names = Counter(r.name for r in records)
    return [make_row(r.name if names[r.name] == 1 else f"{r.name} [{r.run_id[:8]}]", [r], columns)
            for r in records]


def group_rows(records: list[RunRecord], keys: list[str], columns: list[str]) -> list[Row]:
    """One row per distinct combination of the keys' values, in natural order."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(tuple(value_of(r, k) or "(none)" for k in keys), []).append(r)
    rows = []
    for values in sorted(groups, key=lambda vs: [_natural(v) for v in vs]):
        shown = [display_value(v) for v in values]
        label = shown[0] if len(keys) == 1 else " ".join(f"{short_key(k)}={v}" for k, v in zip(keys, shown))
        rows.append(make_row(label, groups[values], columns))
    return rows


def display_value(value: str) -> str:
    """A param value for a label: floats to 4 significant digits (0.012076665792328151 -> 0.01208)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def _natural(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def resolve_baseline(spec: str, rows: list[Row], records: list[RunRecord], columns: list[str],
                     search: Callable[[str], list[RunRecord]]) -> Row:
    """The baseline named by ``spec``: a row label (group), a run id or name, or a filter string.

    Runs outside the table are searched for in the experiment. A filter matching several runs
    (e.g. the seeds of ERM) makes a baseline of their mean.
    """
    for row in rows:
        if row.label == spec:
            return row
    is_filter = bool(_FILTER_OPERATOR.search(spec)) and not _RUN_ID.fullmatch(spec)
    found = [] if is_filter else [r for r in records if spec in (r.run_id, r.name)]
    found = found or search(_baseline_query(spec, is_filter))
    if not found and is_filter:
        raise CompareError(f"--baseline {spec!r}: no run in the experiment matches this filter")
    if not found:
        labels = ", ".join(repr(r.label) for r in rows[:20])
        raise CompareError(f"--baseline {spec!r} matches no row ({labels}), run id or run name; a filter "
                           "such as \"tags.objective = 'erm'\" makes the mean of its runs the baseline")
    if len(found) > 1 and not is_filter:
        raise CompareError(f"--baseline {spec!r} names {len(found)} runs; give one run id: "
                           + ", ".join(r.run_id for r in found))
    return make_row(found[0].name if len(found) == 1 else f"baseline ({spec})", found, columns)


def _baseline_query(spec: str, is_filter: bool) -> str:
    if is_filter:
        return spec
    quoted = quote(spec)
    return f"attributes.run_id = '{quoted}'" if _RUN_ID.fullmatch(spec) else f"attributes.run_name = '{quoted}'"


def apply_baseline(rows: list[Row], baseline: Row) -> list[Row]:
    """Baseline row first, then the others with each cell's difference from the baseline's."""
    baseline.is_baseline = True
    others = [row for row in rows if set(row.run_ids) != set(baseline.run_ids)]
    for row in others:
        for column, cell in row.cells.items():
            base = baseline.cells[column].mean
            cell.delta = None if cell.mean is None or base is None else cell.mean - base
    return [baseline, *others]


def join_runs(records: list[RunRecord], keys: list[str]) -> list[RunRecord]:
    """``--join``: the runs that share the keys' values become one record, e.g. a training run and
    the evaluation of its exported model on more languages (``experiment --extra-languages``).

    The record is the earliest run's (name, params, tags, metrics) with the accuracies
    (``acc.<lang>``) that only the later runs have, and ``standard_avg`` taken again over every
    target language it then has. An accuracy several runs have keeps the earliest's: the same
    model on the same data gives the same accuracy, so a difference over 0.05 points is warned
    about. Reruns within a group (same config and seed) are averaged first, as everywhere. A run
    without one of the keys is left as it is.
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        values = tuple(value_of(r, k) for k in keys)
        groups.setdefault(("run", r.run_id) if None in values else ("join", values), []).append(r)
    return [_joined(runs) for runs in groups.values()]


def _joined(runs: list[RunRecord]) -> RunRecord:
    if len(runs) == 1:
        return runs[0]
    parts = sorted(rerun_groups(sorted(runs, key=lambda r: r.start_time)), key=lambda rs: rs[0].start_time)
    first, metrics = parts[0][0], {}
    for part in parts:
        if len(part) > 1:
            log.warning("--join: %s are reruns (same config and seed): averaged", ", ".join(r.name for r in part))
        keys = {k for r in part for k in r.metrics if k.startswith("acc.") or part is parts[0]}
        for key in sorted(keys):
            value = statistics.fmean(r.metrics[key] for r in part if key in r.metrics)
            if key not in metrics:
                metrics[key] = value
            elif abs(metrics[key] - value) > 5e-4:
                log.warning("--join: %s is %.2f in %s but %.2f in %s (the same model on the same data should "
                            "agree); the first is kept", key, 100 * metrics[key], first.name, 100 * value, part[0].name)
    source = first.params.get("data.source_language", "en")
    targets = [v for k, v in metrics.items() if k.startswith("acc.") and k != f"acc.{source}"]
    if targets:
        metrics["standard_avg"] = statistics.fmean(targets)
    joined = tuple(r.run_id for part in parts for r in part if r is not first)
    return replace(first, metrics=metrics, joined=joined)


def _joining(search: Callable[[str], list[RunRecord]], keys: list[str]) -> Callable[[str], list[RunRecord]]:
    return lambda filter_string: join_runs(search(filter_string), keys)


def build_table(experiment: str, records: list[RunRecord], group_by: list[str] | None = None,
                baseline: str | None = None, search: Callable[[str], list[RunRecord]] | None = None,
                join: list[str] | None = None) -> Table:
    """The comparison table of ``records``; ``search(filter)`` finds baseline runs outside them;
    ``join``: keys whose runs become one record first (:func:`join_runs`)."""
    keys = [resolve_group_key(k) for k in group_by or []]
    if join:
        join_keys = [resolve_group_key(k, "--join") for k in join]
        check_group_keys(join_keys, records, "--join")
        records = join_runs(records, join_keys)
        if search:  # a baseline found outside the records is joined the same way
            search = _joining(search, join_keys)
    check_group_keys(keys, records)
    columns = columns_for(records)
    rows = group_rows(records, keys, columns) if keys else run_rows(records, columns)
    table = Table(experiment, columns, rows, keys)
    if baseline:
        table.baseline = resolve_baseline(baseline, rows, records, columns, search or (lambda f: []))
        table.rows = apply_baseline(rows, table.baseline)
    return table


def without_sweep_parents(records: list[RunRecord]) -> tuple[list[RunRecord], int]:
    """Drop the parent runs of sweeps (their children are the trials); returns how many went."""
    parents = {r.parent_id for r in records if r.parent_id}
    kept = [r for r in records if r.run_id not in parents]
    return kept, len(records) - len(kept)


def add_paired(table: Table) -> None:
    """Per-seed paired differences of every row against the baseline (``--paired``)."""
    from dist_robust.analysis.paired import paired_against

    if table.baseline is None:
        raise CompareError("--paired compares against a baseline: add --baseline (e.g. --baseline erm)")
    table.paired = {row.label: paired_against(row.records, table.baseline.records, table.columns)
                    for row in table.rows if not row.is_baseline}


def compare_runs(client: MlflowClient, experiment: str, filter_string: str = "", run_ids: list[str] | None = None,
                 group_by: list[str] | None = None, baseline: str | None = None,
                 join: list[str] | None = None) -> Table:
    """Query the experiment (sweep parents left out unless named in ``run_ids``) and build its table."""
    for key in group_by or []:
        resolve_group_key(key)  # fail before querying
    for key in join or []:
        resolve_group_key(key, "--join")
    exp = resolve_experiment(client, experiment)
    records = fetch_runs(client, exp.experiment_id, filter_string, run_ids)
    records, parents = (records, 0) if run_ids else without_sweep_parents(records)
    if not records:
        raise CompareError(_no_runs_message(client, exp, filter_string))
    table = build_table(exp.name, records, group_by, baseline,
                        lambda f: search_all(client, [exp.experiment_id], f), join)
    table.parents_left_out = parents
    return table


def _no_runs_message(client: MlflowClient, exp: Experiment, filter_string: str) -> str:
    if not filter_string:
        return f"experiment {exp.name!r} has no runs"
    sample = client.search_runs([exp.experiment_id], "", max_results=1)
    params = ", ".join(k for k in sorted(sample[0].data.params) if not k.startswith("ds.")) if sample else "none"
    return (f"no run in experiment {exp.name!r} matches --filter {filter_string!r}. Param keys contain dots, "
            "e.g. params.`objective.name` = 'pgd' (or use the tag: tags.objective = 'pgd'). "
            f"Params of a run there: {params}")


_EPILOG = """\
filters use MLflow's search syntax; param keys contain dots, so quote them with backticks:
  --filter "params.`objective.name` = 'pgd' and params.`objective.epsilon` = '0.1'"
  --filter "tags.objective != 'erm' and metrics.standard_avg > 0.8 and attributes.status = 'FINISHED'"
params are strings (compare them with quoted values); runs carry the tags task and objective.

--group-by takes params.<key>, tags.<key> (e.g. tags.objective) or an alias:
""" + "".join(f"  {alias:<10} {key}\n" for alias, key in GROUP_ALIASES.items()) + """\
--baseline takes a row label (a group's value, e.g. erm), a run id or run name, or a filter whose
runs' mean is the baseline, e.g. "tags.objective = 'erm'".
"""


def build_parser() -> argparse.ArgumentParser:
    """``dist-robust compare`` options."""
    from dist_robust.analysis.compare_format import FORMATS

    from dist_robust.config.parsing import Parser
    from dist_robust.run.tracking import resolve_experiment as default_experiment

    parser = Parser(prog="dist-robust compare", description=__doc__.split("\n")[0], epilog=_EPILOG)
    parser.add_argument("--experiment", default=default_experiment(None),
                        help="MLflow experiment name (or id). Default: $MLFLOW_EXPERIMENT_NAME, else dist-robust "
                             "(where training runs go by default).")
    parser.add_argument("--mlflow-uri", help="Tracking URI (http://host:5000, sqlite:///mlflow.db, ...). "
                                             "Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")
    parser.add_argument("--runs", nargs="+", metavar="RUN_ID", help="Only these runs (full run ids).")
    parser.add_argument("--filter", default="", help="MLflow search filter (see below).")
    parser.add_argument("--baseline", metavar="RUN_OR_FILTER",
                        help="Show differences against this row, run, or the mean of the runs a filter matches.")
    parser.add_argument("--paired", action="store_true",
                        help="Also pair every row's runs with the baseline's by seed: mean difference, 95%% CI, "
                             "seeds won, Wilcoxon signed-rank p.")
    parser.add_argument("--group-by", nargs="+", action="extend", metavar="KEY",
                        help="Group runs by these params/tags: mean +- std over each group's runs (seeds).")
    parser.add_argument("--join", nargs="+", action="extend", metavar="KEY",
                        help="Join the runs that share these params/tags into one first (e.g. tags.method seed: "
                             "a run and the evaluation of its model on more languages): their accuracies together, "
                             "standard_avg over every target language.")
    parser.add_argument("--format", choices=FORMATS, default="table", help="Output format (default: table).")
    parser.add_argument("--plot-dir", help="Also write PNG and SVG plots into this directory.")
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    """``dist-robust compare``: print the table; 2 with a message when it cannot be made."""
    from mlflow.exceptions import MlflowException

    from dist_robust.analysis.compare_format import render

    args = build_parser().parse_args(argv)
    try:
        client = open_client(args.mlflow_uri)
        table = compare_runs(client, args.experiment, args.filter, args.runs, args.group_by, args.baseline,
                             args.join)
        if args.paired:
            add_paired(table)
        print(render(table, args.format), end="", flush=True)
        if args.plot_dir:
            from dist_robust.analysis.compare_plots import write_comparison_plots

            paths = write_comparison_plots(client, table, args.plot_dir)
            print(f"wrote {len(paths)} plot files to {args.plot_dir}", file=sys.stderr)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: MLflow: {err.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
