"""The comparison table's model, shared by the builder (compare.py), the renderers
(compare_format.py) and the plots (compare_plots.py): cells, rows, the table, and which
metric columns a set of runs has."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dist_robust.analysis.mlflow_runs import RunRecord

AVERAGES = ("standard_avg", "generalized_avg")
# Logged by `dist-robust certify` (certified accuracy at the certificate's reference radius).
CERTIFIED_AVERAGES = ("certified_standard_avg", "certified_generalized_avg")
# Params that differ between two runs of the same experiment setting (where it ran, what it was called).
RUN_LOCAL_PARAMS = {"train.output_dir", "train.staging_dir", "train.resume", "train.progress", "train.log_interval",
                    "data.cache_dir", "tracking.run_name", "tracking.run_id", "tracking.mlflow_uri",
                    "tracking.experiment"}
GROUP_ALIASES = {
    "objective": "params.objective.name",
    "task": "params.data.task",
    "model": "params.model.name",
    "seed": "params.train.seed",
    "epsilon": "params.objective.epsilon",
    "sigma": "params.objective.sigma",
}


@dataclass
class Cell:
    """One table cell: mean (and std) over the row's runs that logged the metric."""

    mean: float | None
    std: float | None
    n: int
    delta: float | None = None


@dataclass
class Row:
    """A run, or a group of runs sharing the ``--group-by`` values."""

    label: str
    records: list[RunRecord]
    samples: int  # independent runs: reruns of one configuration and seed count once (rerun_groups)
    cells: dict[str, Cell] = field(default_factory=dict)
    is_baseline: bool = False

    @property
    def run_ids(self) -> list[str]:
        return [run_id for r in self.records for run_id in (r.run_id, *r.joined)]

    @property
    def seeds(self) -> list[str]:
        return [r.params.get("train.seed", "") for r in self.records]

    @property
    def split(self) -> str:
        """The evaluation split of the row's runs (``dev``, ``test``, ``dev+test``; ``?`` when not logged)."""
        return "+".join(sorted({r.params.get("eval_split", "?") for r in self.records}))


@dataclass
class Table:
    """What every output format renders."""

    experiment: str
    columns: list[str]  # metric keys: acc.<lang>..., standard_avg, generalized_avg
    rows: list[Row]
    group_by: list[str]
    baseline: Row | None = None
    parents_left_out: int = 0
    paired: dict = field(default_factory=dict)  # row label -> column -> paired.Paired (--paired)

    @property
    def headers(self) -> list[str]:
        return [header(c) for c in self.columns]

    @property
    def splits(self) -> set[str]:
        """The rows' evaluation splits: one value when every row was evaluated on the same split."""
        return {row.split for row in self.rows}

    @property
    def run_count(self) -> int:
        return len({run_id for row in self.rows for run_id in row.run_ids})


def rerun_groups(records: list[RunRecord]) -> list[list[RunRecord]]:
    """The runs grouped into reruns: same params (apart from where a run ran) and seed.

    Reruns are one sample, not several: averaged into one value wherever runs are averaged.
    Without a logged seed two runs cannot be told to be reruns: each is its own group.
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        key = tuple(sorted((k, v) for k, v in r.params.items() if k not in RUN_LOCAL_PARAMS)) \
            if "train.seed" in r.params else (r.run_id,)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def header(column: str) -> str:
    """``acc.de`` -> ``de``, ``cert.de`` -> ``de cert``; averages keep their names."""
    if column.startswith("acc."):
        return column[4:]
    if column.startswith("cert.") and column.count(".") == 1:
        return f"{column[5:]} cert"
    return column


def short_key(key: str) -> str:
    """``params.objective.name`` -> ``objective`` (its alias), ``tags.task`` -> ``task``."""
    for alias, full in GROUP_ALIASES.items():
        if full == key:
            return alias
    return key.partition(".")[2]


def columns_for(records: list[RunRecord]) -> list[str]:
    """``acc.<source>`` first, the others in their task's order (as training prints them), then the averages."""
    from dist_robust.data.tasks import task_languages

    langs = {k[4:] for r in records for k in r.metrics if k.startswith("acc.")}
    sources = Counter(r.params.get("data.source_language", "en") for r in records)
    source = sources.most_common(1)[0][0] if sources else "en"
    tasks = Counter(r.params.get("data.task", "") for r in records)
    known = task_languages(tasks.most_common(1)[0][0] if tasks else "")
    rank = {lang: i for i, lang in enumerate(known)}
    ordered = sorted(langs, key=lambda lang: (lang != source, rank.get(lang, len(rank)), lang))
    certified = {k for r in records for k in r.metrics if k.startswith("cert.") and k.count(".") == 1}
    columns = []
    for lang in ordered:  # a certified run's certified accuracy sits beside its clean accuracy
        columns += [f"acc.{lang}"] + ([f"cert.{lang}"] if f"cert.{lang}" in certified else [])
    averages = list(AVERAGES)
    if certified:
        averages += [k for k in CERTIFIED_AVERAGES if any(k in r.metrics for r in records)]
    return columns + averages
