"""``dist-robust align --runs ROOT``: every model of an experiment measured, and the zero-shot gap against it.

The paper's premise, measured directly. For the pretrained model (``--model``) and for every run's
exported model under ``ROOT`` (the folders ``<method>-s<seed>`` that ``dist-robust experiment``
writes; its selection runs are left out), the alignment report of :mod:`.alignment` is written to
``ROOT/align/<folder>.json`` (kept: a rerun measures only what is missing) and logged into the
run's own MLflow run (found by its name, ``<method> s<seed>``, and ``phase=main``).

Then, per method over its seeds:

- **the gap against misalignment**: each language's zero-shot gap (source accuracy minus the
  language's, in points; the run's ``results.json`` and, when there, its ``--extra-languages``
  results) against the *pretrained* model's misalignment of that language (``--measure`` at
  ``--layer``; one property of the language, the same x for every method): the least-squares
  slope and Spearman's rank correlation, mean and 95% interval over seeds, and the slope's paired
  difference from ERM. If robust training makes the model tolerate misalignment as the paper
  says, the gap grows more slowly with it: a negative slope difference.
- **the alignment itself**: the mean over languages of the fine-tuned model's own ``--measure``
  at ``--layer`` and at the last layer, paired against ERM: does the objective move languages
  together, or only make the classifier tolerate the distance?

Written to ``ROOT/align/summary.json``, the console, a plot (``gap_vs_misalignment.png``/``.svg``
in ``--plot-dir``, default ``ROOT/align``) and an MLflow run ``align summary`` (``phase=align-summary``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Any

from dist_robust.infra import storage
from dist_robust.infra.redaction import redact

log = logging.getLogger(__name__)

# A run folder of `dist-robust experiment`: <method>-s<seed>. Names read from a store are checked
# against this before they become paths, MLflow names or file names.
RUN_FOLDER = re.compile(r"^(?P<label>[A-Za-z0-9][A-Za-z0-9_.+-]{0,80})-s(?P<seed>[0-9]{1,9})$")
LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{1,8})?$")
SELECTION = "select-"
PRETRAINED = "pretrained"
BASELINE = "erm"


class AlignRunsError(Exception):
    """What the user must change, in words."""


@dataclass
class ExperimentRun:
    label: str  # the method
    seed: int
    folder: str  # <label>-s<seed>
    accuracy: dict[str, float] = field(default_factory=dict)  # language -> accuracy (0..1)
    source: str = "en"


def _results(uri: str) -> tuple[dict[str, float], str]:
    """A results.json's ``per_language`` (each key a language code, each value a fraction) and source language."""
    try:
        data = json.loads(storage.read_text(uri))
        accuracy = {str(lang): float(acc) for lang, acc in data["per_language"].items()
                    if LANGUAGE.match(str(lang)) and 0.0 <= float(acc) <= 1.0}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AlignRunsError(f"{uri}: not a results file of dist-robust ({type(err).__name__}: {err})") from None
    source = data.get("source_language", "en")
    return accuracy, source if isinstance(source, str) and LANGUAGE.match(source) else "en"


def experiment_runs(root: str) -> list[ExperimentRun]:
    """The finished comparison runs under ``root`` (selection runs left out), by method then seed."""
    runs = []
    for name in storage.listdir(root):
        match = RUN_FOLDER.match(name)
        if not match or match["label"].startswith(SELECTION):
            continue
        results = storage.join(root, name, "results.json")
        if not storage.exists(results) or not storage.exists(storage.join(root, name, "model", "config.json")):
            continue  # unfinished, or trained with --no-export-model
        accuracy, source = _results(results)
        extra = storage.join(root, "extra", name, "results.json")
        if storage.exists(extra):
            accuracy = {**_results(extra)[0], **accuracy}  # the run's own figures win for the source
        runs.append(ExperimentRun(match["label"], int(match["seed"]), name, accuracy, source))
    return sorted(runs, key=lambda r: (r.label != BASELINE, r.label, r.seed))


def layer_index(report: dict, layer: str) -> int:
    """``embeddings``, ``layer<k>`` or ``last`` -> the index in the report's layers."""
    layers = report["layers"]
    if layer == "last":
        return len(layers) - 1
    if layer not in layers:
        raise AlignRunsError(f"--layer {layer}: the model has {', '.join(layers)} (or last)")
    return layers.index(layer)


def misalignment_of(report: dict, measure: str, layer: str) -> dict[str, float]:
    """language -> the report's ``measure`` at ``layer``, as a misalignment (larger: further from English)."""
    k = layer_index(report, layer)
    sign = 1.0 if measure == "relative_distance" else -1.0  # cosine and retrieval grow with alignment
    offset = 0.0 if measure == "relative_distance" else 1.0  # 1 - cosine, 1 - retrieval
    return {lang: offset + sign * values[measure][k] for lang, values in report["languages"].items()}


def _kept_report(path: str, languages: list[str], sentences: int) -> dict | None:
    """A report written before for the same sentences and (at least) these languages, else None."""
    if not storage.exists(path):
        return None
    try:
        report = json.loads(storage.read_text(path))
        if report.get("requested_sentences", report.get("sentences")) == sentences and \
                set(languages) <= set(report["languages"]):
            return report
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    log.warning("%s was measured with other sentences or languages, or is unreadable: measuring again", path)
    return None


class Measurer:
    """Measures one model folder (local or in a store), keeping the report under ``ROOT/align``."""

    def __init__(self, args, languages: list[str]):
        self.args, self.languages = args, languages
        self.folder = storage.join(args.runs, "align")
        self.measured = 0

    def report(self, name: str, model: str) -> dict:
        from dist_robust.analysis.alignment import align_report

        path = storage.join(self.folder, f"{name}.json")
        kept = _kept_report(path, self.languages, self.args.max_sentences)
        if kept is not None:
            return kept
        print(f"measuring {name} ({redact(model)})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            local = model
            if not storage.is_local(model):
                local = os.path.join(tmp, "model")
                storage.download_dir(model, local)
            report = align_report(storage.local_path(local), self.args.task, self.args.data_dir, self.languages,
                                  self.args.max_sentences, self.args.batch_size)
        report["model"] = redact(model)
        report["requested_sentences"] = self.args.max_sentences
        storage.write_text(path, json.dumps(report, indent=1))
        self.measured += 1
        return report


def summarize(runs: list[ExperimentRun], reports: dict[str, dict], pretrained: dict, measure: str,
              layer: str) -> dict[str, Any]:
    """The gap-against-misalignment slopes and the alignment change per method (see the module's text)."""
    from dist_robust.analysis.alignment import slopes_by_objective

    x = misalignment_of(pretrained, measure, layer)
    by_method: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        by_method.setdefault(run.label, {})[run.seed] = run.accuracy
    usable = {m: seeds for m, seeds in by_method.items()
              if all(len([lang for lang in x if lang in acc]) >= 3 for acc in seeds.values())}
    slopes = slopes_by_objective(usable, x, baseline=BASELINE)
    alignment = alignment_change(runs, reports, pretrained, measure, layer, languages=list(x))
    source = {(run.label, run.seed): run.source for run in runs}
    gaps = {method: {lang: [100 * (acc[source[method, seed]] - acc[lang]) for seed, acc in seeds.items() if lang in acc]
                     for lang in x} for method, seeds in usable.items()}
    return {"measure": measure, "layer": layer, "misalignment": x, "slopes": slopes, "alignment": alignment,
            "gaps": gaps, "runs": {m: sorted(seeds) for m, seeds in by_method.items()},
            "left_out": sorted(set(by_method) - set(usable))}


def alignment_change(runs: list[ExperimentRun], reports: dict[str, dict], pretrained: dict, measure: str, layer: str,
                     languages: list[str]) -> dict[str, dict]:
    """Per method, at ``layer`` and at the last layer: the fine-tuned models' misalignment (mean over
    ``languages``) over seeds, the pretrained model's, and the per-seed difference from ERM's."""
    from dist_robust.analysis.paired import paired

    out: dict[str, dict] = {}
    for where in dict.fromkeys((layer, "last")):
        own: dict[str, dict[int, float]] = {}  # method -> seed -> mean misalignment
        for run in runs:
            mis = misalignment_of(reports[run.folder], measure, where)
            own.setdefault(run.label, {})[run.seed] = statistics.fmean(mis[lang] for lang in languages if lang in mis)
        before = misalignment_of(pretrained, measure, where)
        for method, seeds in own.items():
            item = {"mean": vars(paired(list(seeds.values()))),
                    "pretrained": statistics.fmean(before[lang] for lang in languages if lang in before)}
            shared = sorted(set(seeds) & set(own.get(BASELINE, {})))
            if method != BASELINE and shared:
                item["vs_" + BASELINE] = vars(paired([seeds[s] - own[BASELINE][s] for s in shared]))
            out.setdefault(method, {})[where] = item
    return out


def _interval(stats: dict, scale: float = 1.0, digits: int = 2) -> str:
    text = f"{scale * stats['mean']:+.{digits}f}"
    if stats.get("low") is not None:
        text += f" [{scale * stats['low']:+.{digits}f}, {scale * stats['high']:+.{digits}f}]"
    return text


def format_summary(summary: dict) -> str:
    measure, layer = summary["measure"], summary["layer"]
    lines = [f"zero-shot gap (points) against the pretrained model's {measure} at {layer}, per method over seeds "
             f"(95% intervals; a negative slope difference: the gap grows more slowly than ERM's)",
             f"  {'method':<18}{'seeds':>6}{'slope':>26}{'spearman':>26}{'slope - ' + BASELINE:>36}"]
    for method, entry in summary["slopes"].items():
        diff = entry.get("slope_vs_" + BASELINE)
        diff_text = (_interval(diff) + (f" p={diff['p']:.2g}" if diff.get("p") is not None else "")) if diff else ""
        lines.append(f"  {method:<18}{len(entry['seeds']):>6}{_interval(entry['slope']):>26}"
                     f"{_interval(entry['spearman'], digits=3):>26}{diff_text:>36}")
    if summary["left_out"]:
        lines.append(f"  (left out, fewer than 3 languages with accuracy: {', '.join(summary['left_out'])})")
    lines.append(f"\nthe fine-tuned models' own {measure}, mean over languages (pretrained: "
                 + ", ".join(f"{w} {v['pretrained']:.3f}" for w, v in next(iter(summary['alignment'].values()),
                                                                             {}).items()) + ")")
    for method, entry in summary["alignment"].items():
        cells = []
        for where, item in entry.items():
            text = f"{where} {item['mean']['mean']:.3f}"
            if "vs_" + BASELINE in item:
                text += f" ({_interval(item['vs_' + BASELINE], digits=3)} vs {BASELINE})"
            cells.append(text)
        lines.append(f"  {method:<18}" + "   ".join(cells))
    return "\n".join(lines)


def gap_figure(summary: dict, title: str):
    """Each language's mean gap over seeds (std as error bars) against its misalignment, one colour per method,
    with the line of the method's mean slope and intercept."""
    import numpy as np
    from matplotlib.figure import Figure

    from dist_robust.run.plots import color_for

    x = summary["misalignment"]
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    span = np.linspace(min(x.values()), max(x.values()), 2)
    for k, (method, by_lang) in enumerate(summary["gaps"].items()):
        langs = [lang for lang, gaps in by_lang.items() if gaps]
        xs = np.array([x[lang] for lang in langs])
        ys = np.array([statistics.fmean(by_lang[lang]) for lang in langs])
        errs = np.array([statistics.stdev(by_lang[lang]) if len(by_lang[lang]) > 1 else 0.0 for lang in langs])
        color = color_for(method, k)
        slope = summary["slopes"][method]
        intercept = statistics.fmean(ys - slope["slope"]["mean"] * xs)
        label = f"{method} (n={len(slope['seeds'])}): slope {_interval(slope['slope'], digits=1)}"
        dodge = (k - (len(summary["gaps"]) - 1) / 2) * 0.006 * (span[1] - span[0])  # methods side by side
        ax.errorbar(xs + dodge, ys, yerr=errs if errs.any() else None, fmt="o", color=color, capsize=2, markersize=4,
                    label=label)
        ax.plot(span, intercept + slope["slope"]["mean"] * span, color=color, linewidth=1)
        if k == 0:
            for lang, xv, yv in zip(langs, xs, ys):
                ax.annotate(lang, (xv, yv), textcoords="offset points", xytext=(4, 3), fontsize=7, color="#555555")
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_xlabel(f"pretrained model's {summary['measure'].replace('_', ' ')} at {summary['layer']} "
                  "(misalignment with English)")
    ax.set_ylabel("zero-shot gap (source - language, points)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def _summary_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for method, entry in summary["slopes"].items():
        for name in ("slope", "spearman", "slope_vs_" + BASELINE):
            if name in entry:
                out[f"gap_vs_misalignment.{method}.{name}"] = entry[name]["mean"]
    for method, entry in summary["alignment"].items():
        for where, item in entry.items():
            out[f"own_misalignment.{method}.{where}"] = item["mean"]["mean"]
    return out


def run_over_experiment(args) -> int:
    """The ``--runs`` mode of ``dist-robust align`` (its parser's arguments); returns the exit status."""
    from dist_robust.analysis.alignment import MEASURES, format_report
    from dist_robust.run import plots

    if args.measure not in MEASURES:
        raise AlignRunsError(f"--measure {args.measure}: one of {', '.join(MEASURES)}")
    runs = experiment_runs(args.runs)
    if not runs:
        raise AlignRunsError(f"--runs {args.runs}: no finished run with an exported model (folders "
                             "<method>-s<seed> holding results.json and model/, as dist-robust experiment writes)")
    measurer = Measurer(args, args.languages)
    pretrained = measurer.report(PRETRAINED, args.model)
    layer_index(pretrained, args.layer)  # a wrong --layer fails before the long part
    tracking = _Tracking(args)
    tracking.log_model_report(PRETRAINED, None, pretrained)
    reports = {}
    for i, run in enumerate(runs, 1):
        reports[run.folder] = measurer.report(run.folder, storage.join(args.runs, run.folder, "model"))
        tracking.log_model_report(run.folder, run, reports[run.folder])
        log.info("%d/%d models measured or kept", i, len(runs))
    print(format_report(pretrained), flush=True)
    summary = summarize(runs, reports, pretrained, args.measure, args.layer)
    storage.write_text(storage.join(args.runs, "align", "summary.json"), json.dumps(summary, indent=1))
    print("\n" + format_summary(summary), flush=True)
    plot_dir = args.plot_dir or (storage.local_path(storage.join(args.runs, "align"))
                                 if storage.is_local(args.runs) else tempfile.mkdtemp())
    paths = []
    if summary["gaps"]:
        title = f"{os.path.basename(args.runs.rstrip('/'))}: zero-shot gap against misalignment"
        paths = plots.save_figure(gap_figure(summary, title), plot_dir, "gap_vs_misalignment")
        where = paths[0]
        if not (args.plot_dir or storage.is_local(args.runs)):  # beside the reports in the store
            for path in paths:
                storage.upload_file(path, storage.join(args.runs, "align", os.path.basename(path)))
            where = storage.join(args.runs, "align", os.path.basename(paths[0]))
        print(f"\nplot: {where}", flush=True)
    tracking.log_summary(summary, paths)
    print(f"{measurer.measured} model(s) measured now, {len(runs) + 1 - measurer.measured} kept from before",
          flush=True)
    return 0


class _Tracking:
    """MLflow for the ``--runs`` mode: each model's report into its training run, the summary into one run."""

    def __init__(self, args):
        from dist_robust.run.tracking import resolve_experiment, resolve_uri

        self.args = args
        self.uri = resolve_uri(args.mlflow_uri)
        self.experiment = resolve_experiment(args.experiment)
        self.client = None
        if self.uri is not None:
            from dist_robust.analysis.mlflow_runs import open_client

            self.client = open_client(self.uri)

    def _find(self, filter_string: str) -> str | None:
        from dist_robust.analysis.mlflow_runs import search_all

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return None
        found = search_all(self.client, [exp.experiment_id], filter_string)
        return found[-1].run_id if found else None  # the latest

    def log_model_report(self, name: str, run: ExperimentRun | None, report: dict) -> None:
        """Into the training run (or a run of its own for the pretrained model); once per report."""
        from dist_robust.analysis.alignment import metrics_of
        from dist_robust.analysis.mlflow_runs import quote
        from dist_robust.run.tracking import MLflowTracker

        if self.client is None or report.get("logged_to") == redact(self.uri):
            return
        if run is None:
            run_id = self._find(f"tags.phase = 'align' and tags.method = '{PRETRAINED}'")
            tags = {"phase": "align", "method": PRETRAINED, "model": report["model"]}
        else:
            run_id = self._find(f"tags.mlflow.runName = '{quote(f'{run.label} s{run.seed}')}' "
                                "and tags.phase = 'main'")
            tags = {"phase": "align", "method": run.label, "seed": str(run.seed)}
        tracker = MLflowTracker(self.uri, self.experiment, f"align {name}", run_id=run_id,
                                tags=None if run_id else tags)
        tracker.log_metrics(metrics_of(report), step=0)
        tracker.log_dict(report, "alignment.json")
        tracker.finish()
        report["logged_to"] = redact(self.uri)
        storage.write_text(storage.join(self.args.runs, "align", f"{name}.json"), json.dumps(report, indent=1))

    def log_summary(self, summary: dict, plot_paths: list[str]) -> None:
        from dist_robust.run.tracking import MLflowTracker

        if self.client is None:
            return
        run_id = self._find("tags.phase = 'align-summary'")
        tracker = MLflowTracker(self.uri, self.experiment, "align summary", run_id=run_id,
                                tags=None if run_id else {"phase": "align-summary"})
        tracker.log_metrics(_summary_metrics(summary), step=0)
        tracker.log_dict(summary, "gap_vs_misalignment.json")
        for path in plot_paths:
            tracker.log_artifact(path, "plots")
        tracker.finish()
