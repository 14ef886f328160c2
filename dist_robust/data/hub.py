"""PAWS-X and XNLI from the Hugging Face hub, mapped onto :class:`PairExample`.

* ``google-research-datasets/paws-x``, one config per language: ``id``, ``sentence1``,
  ``sentence2``, ``label`` (0 not paraphrase / 1 paraphrase); splits train (English 49,401;
  other languages machine-translated), validation, test.
* ``facebook/xnli``, one config per language: ``premise``, ``hypothesis``, ``label``
  (0 entailment / 1 neutral / 2 contradiction); no id column, so the row number is the id
  (rows are in the same order in every language, which the generalized sets rely on).

The hub cannot be reached everywhere; a failed load says how to use local files instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dist_robust.data.examples import PairExample
from dist_robust.data.readers import DataFileError, LabelSet, ReadResult


@dataclass(frozen=True)
class HubSchema:
    """How one hub dataset's columns map onto ours."""

    name: str
    sentence1: str
    sentence2: str
    id: str | None


HUB_SCHEMAS = {
    "pawsx": HubSchema("google-research-datasets/paws-x", "sentence1", "sentence2", "id"),
    "xnli": HubSchema("facebook/xnli", "premise", "hypothesis", None),
}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


class HubUnavailableError(RuntimeError):
    """The hub dataset could not be loaded (offline, unknown config, ...)."""


def hub_location(task: str, lang: str, split: str) -> str:
    """A readable name of one hub split, used in logs and leakage reports."""
    return f"hub:{HUB_SCHEMAS[task].name}/{lang}/{HUB_SPLITS[split]}"


def load_hub_split(task: str, lang: str, split: str, labels: LabelSet, cache_dir: str | None = None,
                   skip_bad_rows: bool = False) -> ReadResult:
    """One language's split from the hub (``split`` in train/dev/test)."""
    import datasets

    schema = HUB_SCHEMAS[task]
    try:
        ds = datasets.load_dataset(schema.name, lang, split=HUB_SPLITS[split], cache_dir=cache_dir)
    except Exception as e:  # the datasets library raises many types for "could not fetch"
        raise HubUnavailableError(
            f"could not load {schema.name} (config {lang!r}, split {HUB_SPLITS[split]!r}) from the hub: "
            f"{type(e).__name__}: {e}. Offline? Use local files: --data-dir DIR with {task}/{{lang}}/{{split}}.tsv "
            "and --train-file for English training data (dist-robust augment: --input)") from e
    return from_hub(ds, task, lang, split, labels, skip_bad_rows)


def from_hub(ds: Any, task: str, lang: str, split: str, labels: LabelSet,
             skip_bad_rows: bool = False) -> ReadResult:
    """Map a loaded hub split (a ``datasets.Dataset`` in the hub schema) to pair examples.

    Label -1 is the hub's documented mark of a missing or wrong label (PAWS-X train has
    some): such rows are always skipped and listed in ``skipped``. Any other unknown label
    is an error naming the row, unless ``skip_bad_rows``.
    """
    schema = HUB_SCHEMAS[task]
    needed = [c for c in (schema.sentence1, schema.sentence2, "label", schema.id) if c is not None]
    missing = [c for c in needed if c not in ds.column_names]
    where = hub_location(task, lang, split)
    if missing:
        raise DataFileError(f"{where}: columns {missing} missing (found {ds.column_names}); "
                            "the hub schema changed?")
    _check_label_names(ds, labels, where)
    ids = ds[schema.id] if schema.id else range(len(ds))
    result = ReadResult(where, [])
    for i, (ex_id, s1, s2, label) in enumerate(zip(ids, ds[schema.sentence1], ds[schema.sentence2],
                                                   ds["label"])):
        index = labels.index(label)
        if index is None:
            problem = f"{where}: row {i}: label {label!r} is not one of {list(labels.names)}"
            if label != -1 and not skip_bad_rows:
                raise DataFileError(f"{problem} (pass --skip-bad-rows to skip such rows)")
            result.skipped.append(problem)
            continue
        result.examples.append(PairExample(str(ex_id), s1, s2, index, lang, lang))
    return result


def _check_label_names(ds: Any, labels: LabelSet, where: str) -> None:
    """The hub's class order must be ours, or integer labels would silently mean other classes."""
    feature = ds.features.get("label")
    names = getattr(feature, "names", None)
    if names is None:
        return
    if list(names) not in (list(labels.values), list(labels.names)):
        raise DataFileError(f"{where}: label classes {names} do not match ours {list(labels.names)}")
