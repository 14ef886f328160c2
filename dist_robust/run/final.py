"""The final evaluation: the selected (best) checkpoint on the final split's per-language sets and the
generalized language x language matrix, and its certification."""

from __future__ import annotations

import logging

from dist_robust.config.run_config import ConfigError, RunConfig
from dist_robust.data.tasks import TaskData
from dist_robust.infra import distributed as D
from dist_robust.infra.redaction import redact_tree
from dist_robust.infra.zero import optimizer_name
from dist_robust.run import certify as C
from dist_robust.run import evaluate as E
from dist_robust.run.checkpointing import load_tag, read_layout
from dist_robust.run import progress
from dist_robust.run.state import Setup, State
from dist_robust.run.tags import BEST

log = logging.getLogger(__name__)


def final_split(cfg: RunConfig, data: TaskData) -> str:
    """The split the final evaluation reports: as asked, or test when the task has labelled test sets."""
    if cfg.train.eval_split != "auto":
        return cfg.train.eval_split
    return "test" if data.test else "dev"


def check_final_sets(cfg: RunConfig, data: TaskData) -> None:
    """Problems of the final evaluation's sets, found before the first step rather than after the last."""
    split = final_split(cfg, data)
    sets = data.test if split == "test" else data.dev
    if not sets:
        raise ConfigError([f"train.eval_split (--eval-split) = {cfg.train.eval_split!r}: the {cfg.data.task} data "
                           f"has no labelled {split} sets here; use --eval-split dev or auto"])
    if cfg.train.generalized:
        E.generalized_sets(sets)  # raises ParallelIdError when two languages' ids differ


def final_evaluation(setup: Setup, state: State) -> dict:
    """Test (or dev) accuracy per language and the generalized matrix, for the best model."""
    cfg = setup.cfg
    if state.best_step != state.step:
        _load_best(setup, state)
    split, cells = _final_cells(setup)
    # The diagonal cells are the per-language sets: every distinct pair is run once, and on dev
    # the per-language accuracies of the selected model were measured when it was selected.
    known = setup.dev_measured.get(state.best_step) if split == "dev" else None
    k = cfg.train.generalized_examples
    known = {lang: a for lang, a in (known or {}).items() if (lang, lang) in cells}
    all_sets = {("gen", a, b): rows if a == b else E.spaced_subset(rows, k) for (a, b), rows in cells.items()
                if not (a == b and a in known)}
    acc = _run_final_sets(setup, split, all_sets) if all_sets else {}
    acc.update({("gen", lang, lang): a for lang, a in known.items()})
    acc = {("gen", a, b): acc[("gen", a, b)] for a, b in cells}  # in the sets' order
    per_language = {key[1]: a for key, a in acc.items() if key[1] == key[2]}
    matrix = E.matrix_from_cells({key[1:]: a for key, a in acc.items()}) if cfg.train.generalized else {}
    return {
        "task": cfg.data.task,
        "objective": cfg.objective.name,
        "eval_split": split,
        "source_language": cfg.data.source_language,
        "best_step": state.best_step,
        "best_dev_source_acc": state.best_score,
        "skipped_steps": state.skipped_steps,
        "max_delta_norm": state.max_delta_norm,
        "seconds_per_step": state.seconds_per_step,
        "per_language": per_language,
        "generalized": matrix,
        "generalized_examples": cfg.train.generalized_examples,
        "eval_sizes": {a: len(rows) for (a, b), rows in cells.items() if a == b},  # pairs per language's set
        **E.summarize(per_language, matrix, cfg.data.source_language),
        "train_losses": state.train_losses,
        "dev_history": state.dev_history,
        "config": redact_tree({**setup.cfg.to_dict(), "ds_config": setup.plan.engine_config(), "world_size": D.world_size(),
                               "optimizer": optimizer_name(setup.engine)}),
    }


def _final_cells(setup: Setup) -> tuple[str, dict]:
    """The final split, and its sets as (sentence1 language, sentence2 language) cells: the
    generalized matrix, or the per-language diagonal alone with --no-generalized."""
    split = final_split(setup.cfg, setup.data)
    sets = setup.data.test if split == "test" else setup.data.dev
    if setup.cfg.train.generalized:
        return split, E.generalized_sets(sets)
    return split, {(lang, lang): rows for lang, rows in sets.items()}


def certify_final(setup: Setup) -> dict:
    """Certified accuracy of the smoothed model on the final evaluation's sets (dist_robust.run.certify)."""
    cfg, c = setup.cfg, setup.cfg.certify
    split, cells = _final_cells(setup)
    named = {f"{a}>{b}": E.spaced_subset(rows, c.examples) for (a, b), rows in cells.items()}
    smoothing = C.smoothing_for(cfg, setup.data.synonyms)
    certifier = C.Certifier(setup.engine, setup.perturbation, setup.tokenizer, setup.collator, cfg.model.max_length,
                            smoothing)
    local = -(-sum(len(rows) for rows in named.values()) // D.world_size())
    bar = progress.bar(cfg.train, local, f"certify {split} ({c.method})", "pair")
    acc = C.certify_sets(certifier, named, bar)
    if bar is not None:
        bar.close()
    return C.report(cfg, smoothing, split, {(a, b): acc[f"{a}>{b}"] for a, b in cells})


def _run_final_sets(setup: Setup, split: str, sets: dict) -> dict:
    cfg = setup.cfg
    prepared = E.prepare(sets, setup.tokenizer, cfg.model.max_length)
    bar = progress.bar(cfg.train, E.num_batches(prepared, cfg.train.eval_batch_size), f"evaluate {split}", "batch")
    acc = E.accuracy(setup.engine, prepared, setup.collator, cfg.train.eval_batch_size, bar)
    if bar is not None:
        bar.close()
    return acc


def _load_best(setup: Setup, state: State) -> None:
    """Load the checkpoint ``best`` names into the engine, at any ZeRO stage.

    A full ``load_checkpoint`` of that tag: DeepSpeed's module-only load under ZeRO-3 rebuilds
    the weights from the checkpoint root *without* the tag (the ``latest`` one), which would
    evaluate and export the last step while reporting the best. The best step and score are
    read from the loaded checkpoint itself, so the report always describes the weights it used.
    """
    tag = setup.store.agreed(BEST)
    if tag is None:
        raise RuntimeError(f"the best checkpoint (step {state.best_step}) is missing from {setup.store.root}: "
                           f"no '{BEST}' pointer")
    local_root = setup.store.fetch(setup.store.root, tag)
    client_state = load_tag(setup.engine, local_root, tag, read_layout(local_root, tag), load_lr_scheduler_states=False)
    best = client_state["dist_robust"]
    state.best_step, state.best_score = best["best_step"], best["best_score"]
    log.info("loaded the best checkpoint %s (step %d, %s dev accuracy %.4f)", tag, state.best_step,
             setup.cfg.data.source_language, state.best_score)
