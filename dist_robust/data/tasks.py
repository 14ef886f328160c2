"""Task registry: a name maps to a builder returning training and evaluation examples."""

from __future__ import annotations

from collections.abc import Callable

from dist_robust.config.run_config import ConfigError, DataConfig
from dist_robust.data import synthetic
from dist_robust.data.real_tasks import pawsx, xnli
from dist_robust.data.taskdata import TaskData

__all__ = ["TASK_BUILDERS", "TaskData", "get_task"]


def _synthetic(cfg: DataConfig, train: bool = True) -> TaskData:  # generated either way: it costs nothing
    langs = tuple(cfg.languages) or synthetic.LANGUAGES
    if cfg.source_language not in langs:
        langs = (cfg.source_language, *langs)
    world = synthetic.SyntheticWorld()
    train = synthetic.generate("train", cfg.synthetic_train_size, [cfg.source_language], world)
    dev = synthetic.generate("dev", cfg.synthetic_eval_size, langs, world)
    test = synthetic.generate("test", cfg.synthetic_eval_size, langs, world)
    return TaskData("synthetic", synthetic.LABELS, train[cfg.source_language], dev, test,
                    anchors=world.anchors(cfg.synthetic_misalignment, langs), words=world.words(),
                    synonyms=world.neighbors())


# (config, whether the training split is needed) -> the task's data
TASK_BUILDERS: dict[str, Callable[[DataConfig, bool], TaskData]] = {
    "synthetic": _synthetic,
    "pawsx": pawsx,
    "xnli": xnli,
}


def task_languages(task: str) -> tuple[str, ...]:
    """The languages of a task in the order it reports them (empty for an unknown task)."""
    from dist_robust.data.real_tasks import PAWSX, XNLI

    return {"synthetic": synthetic.LANGUAGES, "pawsx": PAWSX.languages, "xnli": XNLI.languages}.get(task, ())


def task_num_labels(task: str) -> int | None:
    """How many classes a task has (None for an unknown task)."""
    from dist_robust.data.readers import PAWSX_LABELS, XNLI_LABELS

    return {"synthetic": len(synthetic.LABELS), "pawsx": len(PAWSX_LABELS.names),
            "xnli": len(XNLI_LABELS.names)}.get(task)


def get_task(cfg: DataConfig, train: bool = True) -> TaskData:
    """Build the configured task, trimmed to the configured sizes.

    ``train=False`` (evaluation only): a real task reads no training split unless
    ``--train-file`` names one.
    """
    if cfg.task not in TASK_BUILDERS:
        raise ValueError(f"unknown task {cfg.task!r}; available: {', '.join(sorted(TASK_BUILDERS))}")
    known = task_languages(cfg.task)
    unknown = [lang for lang in [*cfg.languages, cfg.source_language] if lang not in known]
    if unknown and (cfg.task == "synthetic" or cfg.data_dir is None):  # a data directory may hold more languages
        key = "data.languages (--languages)" if set(unknown) - {cfg.source_language} else \
            "data.source_language (--source-language)"
        raise ConfigError([f"{key} = {' '.join(unknown)}: {cfg.task} has no such language; accepted: "
                           f"{' '.join(known)}"])
    data = TASK_BUILDERS[cfg.task](cfg, train)
    if cfg.max_train_examples is not None:
        data.train = data.train[: cfg.max_train_examples]
    if cfg.max_eval_examples is not None:
        k = cfg.max_eval_examples
        data.dev = {lang: rows[:k] for lang, rows in data.dev.items()}
        data.test = {lang: rows[:k] for lang, rows in data.test.items()}
    return data
