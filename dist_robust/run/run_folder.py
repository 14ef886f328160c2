"""One output directory, one run: a new run never writes over another run's outputs.

Every README command writes to ``runs/default`` unless told otherwise, so a second command
would otherwise prune the first run's checkpoints, move its pointers and overwrite its
model and results. Before anything is written, :func:`check` looks at ``--output-dir``:

- nothing of a run there (or only what a run that never checkpointed left): the run starts;
- another run's checkpoints, exported model or results: the run is refused, with one line
  offering ``--resume auto`` (continue it), ``--overwrite`` (replace it) or another
  ``--output-dir``;
- ``--resume`` into a directory whose ``run.json`` describes a run configured differently
  (another objective, model, task, seed, ...): refused, naming the keys that differ, since
  continuing would mix two runs in one trajectory.

``run.json`` (written by :func:`claim` when a run starts fresh) records what identifies the
run: the keys of :data:`IDENTITY`. Everything else (data files, steps, schedule, ranks,
evaluation, paths, logging) may change between a run and its resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from dist_robust.infra import storage
from dist_robust.config.run_config import ObjectiveConfig, RunConfig, get_key

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = "dist-robust-run/1"
# What a run writes into its output directory; --overwrite removes exactly these.
OUTPUTS = ("checkpoints", "universal-checkpoints", "model", "tokenizer", "results.json", "generalized.csv",
           "mlflow-journal.jsonl", "mlflow-journal-files", RUN_FILE)
# What names a run: the model, the task, the method with its settings, the seed. Resuming with
# other values of these is refused (the results would describe one run and hold another's model);
# everything else (data files, steps, schedule, batch, ranks, evaluation, paths) may change on resume.
IDENTITY = ("model.name", "data.task", "data.source_language", "data.augment", "data.synonym_prob",
            *(f"objective.{f.name}" for f in dataclasses.fields(ObjectiveConfig)), "train.seed")


class RunFolderError(RuntimeError):
    """The output directory holds another run: what is there, and the three ways on."""


def identity(cfg: RunConfig) -> dict:
    """The values of :data:`IDENTITY` for this run."""
    return {key: get_key(cfg, key) for key in IDENTITY}


def digest(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _what_is_there(out: str) -> str | None:
    """A few words on the run whose outputs are in ``out`` (finished, or checkpointed at a step), or None."""
    if storage.exists(storage.join(out, "results.json")):
        return "a finished run (results.json)"
    checkpoints = storage.join(out, "checkpoints")
    latest = storage.join(checkpoints, "latest")
    if storage.exists(latest) and not storage.isdir(latest):
        return f"a run checkpointed at {storage.read_text(latest).strip()[:40]}"
    tags = [n for n in storage.listdir(checkpoints) if n.startswith(("step-", "best-"))]
    if tags:
        return f"a run's checkpoints ({', '.join(tags[:3])})"
    if storage.exists(storage.join(out, "model")):
        return "an exported model (model/)"
    return None


def _recorded(out: str) -> dict | None:
    """The identity a run recorded in ``out/run.json`` (None: no record, or not one of ours)."""
    path = storage.join(out, RUN_FILE)
    if not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
    except ValueError:
        return None
    ident = record.get("identity") if isinstance(record, dict) else None
    return ident if isinstance(ident, dict) else None


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every identity key whose value differs (keys one side lacks are skipped)."""
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in IDENTITY
            if key in old and key in new and old[key] != new[key]]


def check(cfg: RunConfig) -> None:
    """Raise :class:`RunFolderError` when this run would write over another run in ``--output-dir``.

    Read-only, so every rank may call it before the process group exists.
    """
    t = cfg.train
    out = t.output_dir
    if t.overwrite:
        return
    try:
        _check(cfg, out)
    except (OSError, ValueError) as err:  # an object store away, credentials, a file where a directory goes
        raise RunFolderError(f"--output-dir {out}: could not look for an earlier run there ({type(err).__name__}: "
                             f"{str(err).strip()[:200]}); nothing was started. Check the path or the store and "
                             f"its credentials") from None


def _check(cfg: RunConfig, out: str) -> None:
    t = cfg.train
    if t.resume:
        old = _recorded(out)
        # Keys one side lacks are skipped: an option added since (a new objective's) was never set there.
        diff = differences(old, identity(cfg)) if old is not None else []
        if diff:
            raise RunFolderError(
                f"--output-dir {out} holds a run configured differently ({'; '.join(diff[:6])}"
                f"{' ...' if len(diff) > 6 else ''}): --resume would continue it with these values. Resume it "
                f"with its own settings, pass --overwrite to replace it, or choose another --output-dir")
        return
    there = _what_is_there(out)
    if there is not None:
        raise RunFolderError(
            f"--output-dir {out} already holds {there}; nothing was changed. Add --resume auto to continue it, "
            f"--overwrite to replace it, or choose another --output-dir")


def claim(cfg: RunConfig, put) -> None:
    """Make ``--output-dir`` this run's (rank 0, after :func:`check`): clear a run --overwrite replaces,
    and record this run's identity unless a resumed run already has one.

    ``put(relative path, text)`` writes a file of the output directory (publishing it when remote).
    """
    out = cfg.train.output_dir
    if cfg.train.overwrite:
        removed = [name for name in OUTPUTS if storage.exists(storage.join(out, name))]
        for name in removed:
            storage.remove(storage.join(out, name))
        if removed:
            log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), out)
    if cfg.train.resume and _recorded(out) is not None:
        return
    ident = identity(cfg)
    put(RUN_FILE, json.dumps({"format": RUN_FORMAT, "digest": digest(ident), "identity": ident}, indent=1,
                             sort_keys=True))
