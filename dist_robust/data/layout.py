"""Where a task's split file lives under a data directory (local path or fsspec URL).

Two layouts are understood, tried in this order:

* ours: ``{root}/{task}/{lang}/{split}.{tsv,jsonl,parquet}`` (``root`` may also be the task
  directory itself: ``{root}/{lang}/{split}.tsv``), as in ``shared/data``;
* XTREME's download layout: ``{root}/{task}/{split}-{lang}.tsv`` (or ``{root}/{split}-{lang}.tsv``).
"""

from __future__ import annotations

from dist_robust.infra import storage
from dist_robust.data.readers import MissingDataFileError

EXTENSIONS = ("tsv", "jsonl", "parquet")


def candidates(root: str, task: str, lang: str, split: str) -> list[str]:
    """Every location tried for one split file, in order of preference."""
    ours = [storage.join(base, lang, f"{split}.{ext}")
            for base in (storage.join(root, task), root) for ext in EXTENSIONS]
    xtreme = [storage.join(base, f"{split}-{lang}.tsv") for base in (storage.join(root, task), root)]
    return ours + xtreme


def find_split_file(root: str, task: str, lang: str, split: str) -> str | None:
    """The first existing candidate, or None."""
    return next((uri for uri in candidates(root, task, lang, split) if storage.exists(uri)), None)


def require_split_file(root: str, task: str, lang: str, split: str) -> str:
    """Like :func:`find_split_file`, but a missing file is an error listing what the directory holds."""
    found = find_split_file(root, task, lang, split)
    if found is not None:
        return found
    raise MissingDataFileError(f"no {split} file for language {lang!r} of {task} under {root}; "
                               f"{describe(root, task, lang)}; expected {task}/{lang}/{split}.tsv "
                               f"(or .jsonl/.parquet) or XTREME's {task}/{split}-{lang}.tsv")


def describe(root: str, task: str, lang: str) -> str:
    """What is there: the listings of the directories a split file could be in."""
    task_dir = storage.join(root, task)
    parts = []
    for where in (root, task_dir, storage.join(task_dir, lang), storage.join(root, lang)):
        names = storage.listdir(where)
        if names:
            parts.append(f"{where} holds {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}")
    return "; ".join(parts) if parts else f"{root} is empty or does not exist"
