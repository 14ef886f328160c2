"""PAWS-X and XNLI: English training pairs and per-language evaluation sets, from files or the hub.

Files come from ``--data-dir`` (a local directory or any fsspec URL; see
:mod:`dist_robust.data.layout`) or, without it, from the hub (:mod:`dist_robust.data.hub`).
English training data is ``--train-file`` when given, else the data directory's (or the
hub's) ``{source language}/train`` split; an evaluation-only run (``dist-robust eval``) reads
none unless ``--train-file`` names it.

Which split is reported at the end. ``dev`` is read for every evaluation language and
selects checkpoints. ``test`` is filled only when *every* evaluation language has a
labelled test file and the training file is not the source language's test file itself;
otherwise it is left empty and the trainer reports on dev, so that every language's number
comes from the same split. In ``shared/data`` this means:

* PAWS-X: test labels exist for en/de/ko/zh only (es/fr/ja have ``test_unlabeled.tsv``), so
  ``--languages en de ko zh`` reports test and the 7-language default reports dev;
* XNLI: the offline recipe trains on ``xnli/en/test.tsv``; its test split is then not
  evaluated and all 15 languages are reported on dev (dev and test share no premise).

Before returning, the training set is checked against the source-language side of every
evaluation set (:mod:`dist_robust.data.leakage`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

from dist_robust.infra import distributed as D
from dist_robust.infra import storage
from dist_robust.config.run_config import DataConfig
from dist_robust.data import hub, layout
from dist_robust.data.leakage import check_leakage
from dist_robust.data.readers import (PAWSX_LABELS, XNLI_LABELS, LabelSet, MissingDataFileError,
                                      MissingLabelsError, ReadResult, read_pairs)
from dist_robust.data.taskdata import TaskData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """A real task: its name (also its directory and hub key), labels and languages."""

    name: str
    labels: LabelSet
    languages: tuple[str, ...]


PAWSX = TaskSpec("pawsx", PAWSX_LABELS, ("en", "de", "es", "fr", "ja", "ko", "zh"))
XNLI = TaskSpec("xnli", XNLI_LABELS, ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh",
                                      "hi", "sw", "ur"))


def pawsx(cfg: DataConfig, train: bool = True) -> TaskData:
    """PAWS-X paraphrase identification (labels 0 / 1), 7 languages. See the module doc for splits."""
    return build(PAWSX, cfg, train)


def xnli(cfg: DataConfig, train: bool = True) -> TaskData:
    """XNLI (entailment / neutral / contradiction), 15 languages. See the module doc for splits."""
    return build(XNLI, cfg, train)


class _Source:
    """Split files of one task: from a data directory (local or URL) or, without one, the hub."""

    def __init__(self, spec: TaskSpec, cfg: DataConfig):
        self.spec, self.cfg = spec, cfg
        self.root = cfg.data_dir

    def locate(self, lang: str, split: str) -> str | None:
        if self.root is None:
            return hub.hub_location(self.spec.name, lang, split)
        return layout.find_split_file(self.root, self.spec.name, lang, split)

    def read(self, lang: str, split: str) -> ReadResult:
        cfg = self.cfg
        if self.root is None:
            return read_hub(self.spec, lang, split, cfg)
        uri = layout.require_split_file(self.root, self.spec.name, lang, split)
        return read_file(uri, self.spec, lang, cfg)


def read_file(uri: str, spec: TaskSpec, lang: str, cfg: DataConfig) -> ReadResult:
    """One file of the task with the configured format and bad-row policy; skipped rows are logged."""
    result = read_pairs(uri, spec.labels, lang, cfg.data_format, cfg.skip_bad_rows)
    _report_skipped(result)
    return result


def read_hub(spec: TaskSpec, lang: str, split: str, cfg: DataConfig) -> ReadResult:
    """One split from the hub (downloads under ``{cache_dir}/hub``); skipped rows are logged."""
    cache = storage.join(cfg.cache_dir, "hub") if cfg.cache_dir else None
    result = hub.load_hub_split(spec.name, lang, split, spec.labels, cache, cfg.skip_bad_rows)
    _report_skipped(result)
    return result


def _report_skipped(result: ReadResult) -> None:
    if result.skipped:
        shown = "; ".join(result.skipped[:3])
        log.warning("skipped %d bad row(s) of %s (kept %d): %s%s", len(result.skipped), result.uri,
                    len(result.examples), shown, " ..." if len(result.skipped) > 3 else "")


def evaluation_languages(spec: TaskSpec, cfg: DataConfig) -> list[str]:
    """``--languages`` (default: all), checked, with the source language first if missing."""
    langs = list(cfg.languages) or list(spec.languages)
    unknown = [lang for lang in [*langs, cfg.source_language] if lang not in spec.languages]
    if unknown:
        raise ValueError(f"{spec.name} has no language(s) {unknown}; it has {', '.join(spec.languages)}")
    if cfg.source_language not in langs:
        langs.insert(0, cfg.source_language)
    return langs


def build(spec: TaskSpec, cfg: DataConfig, train_needed: bool = True) -> TaskData:
    """Training pairs, dev (and maybe test) sets per language, checked for leakage.

    ``train_needed=False`` (evaluation only): no training split is read unless ``--train-file``
    names one, which then still decides the test-split rule and the leakage check.
    """
    langs = evaluation_languages(spec, cfg)
    source = _Source(spec, cfg)
    # Hub downloads go to one shared cache: let one rank per node fill it first.
    with D.main_first(local=True) if source.root is None else nullcontext():
        if train_needed or cfg.train_file:
            train = _read_train(spec, cfg, source)
        else:
            train = ReadResult("", [])
        dev = {lang: source.read(lang, "dev") for lang in langs}
        test = _test_sets(source, langs, train.uri)
    src = cfg.source_language
    references = {dev[src].uri: dev[src].examples}
    if test:
        references[test[src].uri] = test[src].examples
    check_leakage(train.examples, train.uri, references, cfg.allow_leakage)
    parts = {**({"train": train} if train.uri else {}), **{f"dev.{k}": v for k, v in dev.items()},
             **{f"test.{k}": v for k, v in test.items()}}
    return TaskData(spec.name, spec.labels.names, train.examples,
                    {lang: r.examples for lang, r in dev.items()},
                    {lang: r.examples for lang, r in test.items()},
                    sources={k: r.uri for k, r in parts.items()},
                    skipped_rows={r.uri: len(r.skipped) for r in parts.values() if r.skipped})


def _read_train(spec: TaskSpec, cfg: DataConfig, source: _Source) -> ReadResult:
    lang = cfg.source_language
    if cfg.train_file:
        return read_file(cfg.train_file, spec, lang, cfg)
    if source.root is not None and source.locate(lang, "train") is None:
        raise MissingDataFileError(
            f"no {lang} training file for {spec.name} under {source.root}; "
            f"{layout.describe(source.root, spec.name, lang)}. Pass --train-file (offline English data: "
            f"paws_wiki_en/test.tsv for pawsx, xnli/en/test.tsv for xnli)")
    return source.read(lang, "train")


def _test_sets(source: _Source, langs: list[str], train_uri: str) -> dict[str, ReadResult]:
    """Labelled test sets of every language, or {} if one lacks them or the training file is one."""
    located = {lang: source.locate(lang, "test") for lang in langs}
    missing = [lang for lang, uri in located.items() if uri is None]
    src_test = located.get(source.cfg.source_language)
    if src_test is not None and source.root is not None and train_uri and \
            storage.canonical(src_test) == storage.canonical(train_uri):
        log.info("the training file is the %s test split: test is not evaluated, reporting dev", src_test)
        return {}
    out: dict[str, ReadResult] = {}
    for lang in langs:
        if missing:
            break
        try:
            out[lang] = source.read(lang, "test")
        except MissingLabelsError:
            missing.append(lang)
    if missing:
        log.info("no labelled test set for %s: final accuracy is reported on dev for every language",
                 ", ".join(missing))
        return {}
    return out
