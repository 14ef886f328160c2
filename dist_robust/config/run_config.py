"""Run configuration: one typed dataclass per concern, one validation pass.

A run is configured from (lowest to highest precedence) the dataclass defaults, an optional
YAML/JSON run file (``--config run.yaml``), dotted ``key=value`` overrides
(``objective.epsilon=0.05``) and explicit command-line flags (``--epsilon 0.05``).
Every field carries its help text and its flag, so the parser, the run file and the
validation messages all speak of the same keys.

The DeepSpeed JSON (``--deepspeed ds_configs/zero2.json``) holds engine settings only; the
values it marks ``"auto"`` are filled from this config (see ``ds_config``), and its problems
are reported by the same validation pass.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from dist_robust import objectives
from dist_robust.infra.section import Section
from dist_robust.objectives import ObjectiveConfig

CERTIFY_METHODS = ("none", "gaussian", "synonym")
TASKS = ("synthetic", "pawsx", "xnli")
AUGMENTATIONS = ("none", "synonym")
DATA_FORMATS = ("auto", "tsv", "xtreme", "jsonl", "parquet")
ZERO_STAGES = (0, 1, 2, 3)
EVAL_SPLITS = ("auto", "dev", "test")
DEV_LANGUAGES = ("all", "source")
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
BUILTIN_MODELS = ("tiny", "xlmr-base-random", "xlmr-large-random")  # model.build.BUILTIN_CONFIGS' names


class ConfigError(ValueError):
    """Every problem found in a run configuration, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


def _f(default: Any, help: str, flag: str | None = None, **extra: Any) -> Any:
    meta = {"help": help, "flag": flag, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig(Section):
    name: str = _f("tiny", "Built-in config (tiny, xlmr-base-random, xlmr-large-random), a hub name "
                   "such as xlm-roberta-large, or a local directory.", "--model")
    tokenizer: str | None = _f(None, "Tokenizer directory or hub name. Default: the model's own; for "
                               "built-in configs one is trained locally on the task text.", "--tokenizer")
    tokenizer_vocab_size: int = _f(4000, "Vocabulary size of a locally trained tokenizer.",
                                   "--tokenizer-vocab-size")
    max_length: int = _f(128, "Maximum tokens per sentence pair (longer pairs are truncated).",
                         "--max-length")
    dropout: float | None = _f(None, "Override hidden and attention dropout of the model config.",
                               "--dropout")
    freeze_embeddings: bool | None = _f(None, "Keep the word-embedding matrix fixed while fine-tuning. Default: "
                                        "on for built-in models on the synthetic task (whose embeddings model "
                                        "a pretrained lexicon), off otherwise.", "--freeze-embeddings")
    embedding_blocks: int | None = _f(None, "Hold the word-embedding matrix as this many blocks of rows, each "
                                      "gathered and reduced on its own (ZeRO-3 only: lowers the peak memory of "
                                      "the embedding's backward; exact). Default: 8 when the embeddings train "
                                      "under a ZeRO-3 config that releases layers after use "
                                      "(stage3_max_live_parameters and stage3_max_reuse_distance <= 1e8, as "
                                      "ds_configs/zero3.json), else 1.", "--embedding-blocks")


@dataclass
class DataConfig(Section):
    task: str = _f("synthetic", "Task: synthetic (built in, no download), pawsx or xnli.", "--task",
                   choices=TASKS)
    data_dir: str | None = _f(None, "Local directory or fsspec URL with {task}/{lang}/{split}.tsv files "
                              "(or .jsonl/.parquet, or XTREME's {task}/{split}-{lang}.tsv); default for "
                              "pawsx/xnli: the hub.", "--data-dir")
    train_file: str | None = _f(None, "Training file (path or URL); default: the task's English train split.",
                                "--train-file")
    data_format: str = _f("auto", "Format of the data files: auto (by extension and header), tsv (header, "
                          "no quoting), xtreme (csv-quoted, no header, no ids), jsonl or parquet.",
                          "--data-format", choices=DATA_FORMATS)
    skip_bad_rows: bool = _f(False, "Skip (count and report) rows with an unknown label or the wrong number of "
                             "columns instead of stopping at the first one.", "--skip-bad-rows")
    allow_leakage: bool = _f(False, "Only warn (instead of refusing to start) when the training set shares "
                             "pairs or sentence1s with an evaluation set.", "--allow-leakage")
    cache_dir: str | None = _f(None, "Local directory for hub downloads and tokenized-dataset caches "
                               "(default: the datasets library's cache; no tokenization cache).", "--cache-dir")
    languages: list[str] = _f([], "Evaluation languages (default: all the task has).", "--languages",
                              nargs="+")
    source_language: str = _f("en", "Language trained on; its dev accuracy selects the best checkpoint.",
                              "--source-language")
    max_train_examples: int | None = _f(None, "Use at most this many training examples.",
                                        "--max-train-examples")
    max_eval_examples: int | None = _f(None, "Use at most this many examples per evaluation language.",
                                       "--max-eval-examples")
    synthetic_train_size: int = _f(4000, "Synthetic task: English training pairs.", "--synthetic-train-size")
    synthetic_eval_size: int = _f(400, "Synthetic task: dev/test pairs per language.", "--synthetic-eval-size")
    synthetic_misalignment: float = _f(2.0, "Synthetic task: how far the target languages' word embeddings start "
                                       "from their English translations' (relative noise norm; 0: aligned). "
                                       "Built-in models only; see docs/synthetic.md.", "--synthetic-misalignment")
    augment: str = _f("none", "On-the-fly augmentation of training pairs (synonym: RS-DA substitution, fresh "
                      "every epoch).", "--augment", choices=AUGMENTATIONS)
    synonyms: str | None = _f(None, "Synonym source for --augment synonym: JSON word -> [neighbour, ...] "
                              "(path or URL), e.g. counterfitted_neighbors.json. The synthetic task has "
                              "its own.", "--synonyms")
    synonym_prob: float = _f(1.0, "--augment synonym: probability that a word with neighbours is redrawn "
                             "(uniformly from itself and its neighbours; 1.0 as in RS-DA).", "--synonym-prob")


@dataclass
class TrainConfig(Section):
    max_steps: int = _f(600, "Optimizer steps to train.", "--max-steps")
    seed: int = _f(42, "Seed for data order, initialization, dropout and perturbations.", "--seed")
    micro_batch_size: int = _f(32, "Examples per rank per micro-step (fills \"auto\" in the ds_config).",
                               "--micro-batch-size")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (fills \"auto\").", "--grad-accum")
    lr: float | None = _f(None, "Peak learning rate (fills \"auto\"); default 2e-3 for built-in configs "
                          "trained from scratch, 1e-5 for pretrained models.", "--lr")
    warmup_ratio: float = _f(0.1, "Fraction of max_steps spent in linear warm-up (fills \"auto\").",
                             "--warmup-ratio")
    eval_steps: int = _f(100, "Evaluate every N steps (0: only at the end).", "--eval-steps")
    dev_languages: str = _f("all", "Languages evaluated on dev during training: all (a dev curve per language) or "
                            "source (only the source language, which selects the best checkpoint; the others are "
                            "then measured once, for the selected model).", "--dev-languages",
                            choices=DEV_LANGUAGES)
    eval_batch_size: int = _f(64, "Examples per rank per evaluation batch.", "--eval-batch-size")
    generalized: bool = _f(True, "Evaluate the generalized language x language matrix at the end.",
                           "--generalized")
    generalized_examples: int | None = _f(None, "Off-diagonal cells of the generalized matrix use this many ids, "
                                          "evenly spaced over the set (the diagonal keeps every pair); "
                                          "default: all.", "--generalized-examples")
    eval_split: str = _f("auto", "Split of the final evaluation: test, dev, or auto (test when every evaluation "
                         "language has a labelled test set, else dev).", "--eval-split", choices=EVAL_SPLITS)
    max_bad_steps: int = _f(20, "Stop after this many consecutive optimizer steps with a non-finite loss or "
                            "gradient (each one is skipped, counted and logged).", "--max-bad-steps")
    save_steps: int = _f(100, "Checkpoint every N steps (0: only the final and best ones).", "--save-steps")
    save_total_limit: int = _f(2, "Keep this many periodic checkpoints.", "--save-total-limit")
    output_dir: str = _f("runs/default", "Where results, checkpoints and the model go: a path or fsspec URL.",
                         "--output-dir")
    staging_dir: str | None = _f(None, "Local directory DeepSpeed writes into before publishing to a "
                                 "remote --output-dir (default: a temporary directory).", "--staging-dir")
    publish_timeout: int = _f(600, "Seconds publishing to a remote --output-dir retries (with backoff) while the "
                              "store is unreachable at the end of the run; during training a checkpoint that "
                              "cannot go out waits in --staging-dir for the next one.", "--publish-timeout")
    resume: str | None = _f(None, "auto (latest checkpoint in --output-dir, if any) or a checkpoint path/URL.",
                            "--resume")
    overwrite: bool = _f(False, "Replace the run already in --output-dir (its checkpoints, model and results are "
                         "deleted first). Without it a run refuses to start over another run's outputs.",
                         "--overwrite")
    trust_checkpoint: bool = _f(False, "Load a checkpoint that has no manifest.json (not written by dist-robust, "
                                "or torn). DeepSpeed unpickles checkpoints: only for sources you trust.",
                                "--trust-checkpoint")
    preempt_grace: float = _f(30.0, "Seconds a preemption signal (SIGTERM, or --preempt-signal) leaves before the "
                              "process is killed: the run finishes the step in progress (and its evaluation, if "
                              "one is due), checkpoints it when the time left allows (judged by this run's last "
                              "checkpoint), and exits with status 75 (resumable: --resume auto). 0: stop at once "
                              "(the last periodic checkpoint is where a resume starts). In a Ray Tune trial, Ray Train's notice "
                              "that a node is being preempted checkpoints the step at once (0: it is not asked).",
                              "--preempt-grace")
    preempt_signal: str = _f("SIGTERM", "A signal that also means preemption, for schedulers that warn with another "
                             "one (SLURM's --signal=USR1@60).", "--preempt-signal", choices=PREEMPT_SIGNALS)
    dist_timeout: int = _f(1800, "Seconds a collective waits for a rank that stopped answering (killed, hung) "
                           "before the job fails.", "--dist-timeout")
    compile: bool = _f(False, "Compile the model with torch.compile through DeepSpeed's engine.compile() (the "
                       "objectives' extra passes go through the same compiled module). The first steps are slower "
                       "while it compiles; on a GPU the later ones are faster.", "--compile")
    export_model: bool = _f(True, "Write the final (best) model with save_pretrained as safetensors, with a model "
                            "card (README.md).", "--export-model")
    log_model: bool = _f(True, "Also log the exported model to MLflow as a pyfunc that labels sentence pairs "
                         "(register it, or serve it with mlflow models serve -m runs:/<run id>/model).", "--log-model")
    progress: bool = _f(True, "Show a progress bar on rank 0.", "--progress")
    verbose: bool = _f(False, "Also show the libraries' messages (DeepSpeed's warnings, Python warnings) on the console; "
                       "by default they go to <output-dir>/logs/libraries-rank<R>.log.", "--verbose")
    log_interval: float = _f(60.0, "Without a progress bar (--no-progress: log files, cluster jobs), rank 0 logs "
                             "the step, the loss, s/step and the time left every this many seconds (0: every "
                             "step).", "--log-interval")
    eval_only: bool = _f(False, "Skip training: evaluate the model as loaded (or as resumed) and write "
                         "results (what `dist-robust eval` does).", "--eval-only")


@dataclass
class TrackingConfig(Section):
    mlflow_uri: str | None = _f(None, "MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, ...). "
                                "Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; 'none' turns tracking off.",
                                "--mlflow-uri", keep=("none", "off"))
    experiment: str | None = _f(None, "MLflow experiment name. Default: $MLFLOW_EXPERIMENT_NAME, else dist-robust.",
                                "--experiment")
    run_name: str | None = _f(None, "MLflow run name (default: objective and output dir).", "--run-name")
    tags: list[str] = _f([], "Extra MLflow tags KEY=VALUE on the run (e.g. method=synonym+pgd), for filters "
                         "and compare --group-by tags.KEY.", "--tags", nargs="+")
    run_id: str | None = _f(None, "Log into this existing MLflow run (a sweep creates one per trial) instead of a "
                            "new one or the one a resumed checkpoint names.")


@dataclass
class CertifyConfig(Section):
    method: str = _f("none", "After the final evaluation, certify the smoothed classifier: gaussian (noise on "
                     "word embeddings, Cohen et al. 2019) or synonym (substitution, SAFER); none: skip.",
                     "--certify", choices=CERTIFY_METHODS)
    samples: int = _f(100, "Noisy copies per example for the certificate's estimate (n).", "--certify-samples")
    selection: int = _f(10, "Noisy copies per example that choose the predicted class (n0).", "--certify-selection")
    alpha: float = _f(0.001, "The certificate fails with probability at most alpha (Clopper-Pearson bound).",
                      "--certify-alpha")
    sigma: float | None = _f(None, "gaussian: noise scale, in --sigma's units. Default: --sigma.", "--certify-sigma")
    radii: list[str] = _f([], "gaussian: radii (in sigma's units) at which certified accuracy is reported. "
                          "Default: 0, 0.5, 1, 1.5 x sigma.", "--certify-radii", nargs="+")
    examples: int | None = _f(None, "Certify this many evenly spaced ids of every set (certification costs "
                              "n0 + n forward passes per pair). Default: all.", "--certify-examples")


@dataclass
class RunConfig(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    ds_config: dict = field(default_factory=dict)
    ds_config_path: str | None = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(dataclasses.replace(self, ds_config={}))  # (a frozen ds_config is a read-only view)
        out["ds_config"] = thawed(self.ds_config)
        return out

    def with_values(self, values: dict[str, Any]) -> RunConfig:
        """A copy with dotted keys set (``{"train.grad_accum": 2}``), typed as :func:`set_key` types them; this
        config (frozen or not) stays as it is."""
        out = from_dict(self.to_dict())
        out.ds_config_path = self.ds_config_path
        for key, value in values.items():
            set_key(out, key, value)
        return out

    def frozen(self) -> RunConfig:
        """A read-only copy (its ``ds_config`` too): what a run follows once its plan is resolved."""
        out = self.with_values({})
        out.ds_config = read_only(out.ds_config)
        for section in _SECTION_CLASSES:
            object.__setattr__(getattr(out, section), "_frozen", True)
        object.__setattr__(out, "_frozen", True)
        return out


def read_only(value: Any) -> Any:
    """Nested mappings as read-only views (lists as tuples), for a frozen config's ds_config."""
    from types import MappingProxyType

    if isinstance(value, dict):
        return MappingProxyType({k: read_only(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(read_only(v) for v in value)
    return value


def thawed(value: Any) -> Any:
    """A plain, mutable deep copy of a (possibly read-only) ds_config, for code that edits its own copy."""
    if isinstance(value, Mapping):
        return {k: thawed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thawed(v) for v in value]
    return value


_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig,
                    "train": TrainConfig, "tracking": TrackingConfig, "certify": CertifyConfig}


def field_kind(f: dataclasses.Field) -> str:
    """A config field's value kind from its annotation: bool, int, float, list or str."""
    t = str(f.type)
    for kind in ("bool", "int", "float", "list"):
        if t.startswith(kind):
            return kind
    return "str"


def from_dict(data: dict) -> RunConfig:
    """The inverse of ``RunConfig.to_dict``."""
    return RunConfig(**{k: _SECTION_CLASSES[k](**v) if k in _SECTION_CLASSES else v for k, v in data.items()})


def iter_fields():
    """Yield (section, dataclass field) for every configurable key."""
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            yield section, f


def get_key(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted ``section.field`` key."""
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def set_key(cfg: RunConfig, key: str, value: Any) -> None:
    """Set a dotted key to an already typed value (a sampled one), kept in the field's type.

    A search space gives ``3.0`` for an integer field and ``1`` for a float one; both are stored
    as the field's own type, so an integer key stays an integer in the run and its logs.
    """
    section, name = key.split(".", 1)
    kind = next(field_kind(f) for s, f in iter_fields() if s == section and f.name == name)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    setattr(getattr(cfg, section), name, value)


def flag_of(section: str, name: str) -> str:
    for s, f in iter_fields():
        if s == section and f.name == name:
            return f.metadata.get("flag") or ""
    return ""


def _key_desc(key: str) -> str:
    section, _, name = key.partition(".")
    flag = flag_of(section, name)
    return f"{key} ({flag})" if flag else key


def _coerce(value: Any, f: dataclasses.Field, key: str) -> Any:
    """Convert a string from a key=value override to the field's type."""
    if value is False and "off" in f.metadata.get("keep", ()):
        return "off"  # YAML reads a bare `off` (and `no`, `false`) as a boolean
    t, kind = str(f.type), field_kind(f)
    if not isinstance(value, str):
        return _check_typed(value, t, kind, key)
    if value.lower() in f.metadata.get("keep", ()):
        return value  # a special value the field gives a meaning of its own (mlflow_uri: none = off)
    if value.lower() in ("none", "null") and "None" in t:
        return None
    try:
        if kind == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "list":
            return [v for v in value.replace(",", " ").split() if v]
    except ValueError:
        raise ConfigError([f"{_key_desc(key)} = {value!r}: expected {t}"]) from None
    return value


def _check_typed(value: Any, t: str, kind: str, key: str) -> Any:
    """A value a run file already typed (YAML/JSON): accept it only when it fits the field."""
    def wrong() -> ConfigError:
        return ConfigError([f"{_key_desc(key)} = {value!r}: expected {t}"])

    if value is None:
        if "None" in t:
            return None
        raise wrong()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise wrong()
    if isinstance(value, bool):  # YAML's yes/no/true/false are no numbers or names
        raise wrong()
    if kind == "int":
        if isinstance(value, int):
            return value
        raise wrong()
    if kind == "float":
        if isinstance(value, (int, float)):
            return float(value)
        raise wrong()
    if kind == "list":
        if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            return [str(v) for v in value]
        raise wrong()
    if isinstance(value, (int, float)):  # a name or path that YAML read as a number (run_name: 2024)
        return str(value)
    raise wrong()


def apply_mapping(cfg: RunConfig, mapping: dict, origin: str) -> None:
    """Apply a nested {section: {key: value}} mapping (from a run file) onto cfg."""
    problems = []
    for section, values in mapping.items():
        if section == "ds_config":
            cfg.ds_config = values
            continue
        if section not in _SECTION_CLASSES or not isinstance(values, dict):
            problems.append(f"{origin}: unknown section {section!r}; accepted: "
                            f"{', '.join(_SECTION_CLASSES)}, ds_config")
            continue
        for name, value in values.items():
            problems.extend(_set(cfg, f"{section}.{name}", value, origin))
    if problems:
        raise ConfigError(problems)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> None:
    """Apply dotted ``section.key=value`` overrides."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"override {item!r}: expected section.key=value, e.g. objective.epsilon=0.1")
            continue
        problems.extend(_set(cfg, key.strip(), value.strip(), "override"))
    if problems:
        raise ConfigError(problems)


def _set(cfg: RunConfig, key: str, value: Any, origin: str) -> list[str]:
    section, _, name = key.partition(".")
    cls = _SECTION_CLASSES.get(section)
    if cls is None:
        return [f"{origin}: unknown key {key!r}; sections are {', '.join(_SECTION_CLASSES)}"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        return [f"{origin}: unknown key {key!r}; {section} accepts {', '.join(fields)}"]
    try:
        setattr(getattr(cfg, section), name, _coerce(value, fields[name], key))
    except ConfigError as e:
        return e.problems
    return []


def read_config_text(path: str, flag: str) -> str:
    """The text of a file the command line names (local path or fsspec URL), or one ConfigError saying why not."""
    from dist_robust.infra.storage import read_text

    try:
        return read_text(path)
    except FileNotFoundError:
        raise ConfigError([f"{flag} {path}: file not found"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except (OSError, ValueError) as e:  # a directory, a name too long, a bad URL, a store that refused
        raise ConfigError([f"{flag} {path}: cannot be read ({type(e).__name__}: {str(e)[:200]})"]) from None


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a run file has no use for them, and a few hundred bytes of nested
    aliases expand to gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "aliases (*name) are not accepted in run files",
                                                    event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str):
    """``yaml.safe_load`` that refuses aliases (see :class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_run_file(path: str) -> dict:
    """Read a YAML or JSON run file (local path or fsspec URL)."""
    text = read_config_text(path, "--config")
    try:
        data = parse_yaml(text) if not path.endswith(".json") else json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([f"--config {path}: not valid JSON ({e})"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"--config {path}: not valid YAML ({' '.join(str(e).split())})"]) from None
    except RecursionError:
        raise ConfigError([f"--config {path}: nested too deeply to be a run file"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: expected a mapping of sections, got {type(data).__name__}"])
    return data


def world_size_from_env() -> int:
    """World size as launchers announce it, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _Problems:
    """Problems found so far, one per key (the first found): ``bad(key, value, accepted)`` adds one."""

    def __init__(self):
        self.lines: list[str] = []
        self._keys: set[str] = set()

    def bad(self, key: str, value: Any, accepted: str) -> None:
        if key not in self._keys:
            self._keys.add(key)
            self.lines.append(f"{_key_desc(key)} = {value!r}: {accepted}")

    def one_of(self, section: Any, prefix: str, key: str, accepted, what: str = "") -> None:
        """``section.key`` must be one of ``accepted`` (the message says "accepted <what>: ...")."""
        value = getattr(section, key)
        if value not in accepted:
            self.bad(f"{prefix}.{key}", value, f"accepted{' ' + what if what else ''}: {', '.join(accepted)}")

    def at_least(self, section: Any, prefix: str, keys: tuple[str, ...], low: int, accepted: str) -> None:
        """Each of ``keys`` in ``section`` (skipped when None) must be ``>= low``."""
        for key in keys:
            value = getattr(section, key)
            if value is not None and value < low:
                self.bad(f"{prefix}.{key}", value, accepted)


def config_problems(cfg: RunConfig, world_size: int) -> list[str]:
    """Every problem of the config's fields, one per key (``validation.validate`` adds the ds_config's)."""
    p = _Problems()
    for section, f in iter_fields():
        value = getattr(getattr(cfg, section), f.name)
        if isinstance(value, float) and not math.isfinite(value):
            p.bad(f"{section}.{f.name}", value, "must be a finite number")
    for tag in cfg.tracking.tags:
        if "=" not in tag or not tag.partition("=")[0]:
            p.bad("tracking.tags", tag, "expected KEY=VALUE, e.g. method=pgd")
    _objective_problems(cfg.objective, p)
    _certify_problems(cfg, p)
    _data_problems(cfg.data, p)
    _model_problems(cfg.model, p)
    _train_problems(cfg.train, p)
    return p.lines


def _objective_problems(o: ObjectiveConfig, p: _Problems) -> None:
    """Each objective's options against their declared bounds (``objectives.options``), its own checks."""
    for line in objectives.PLUGIN_PROBLEMS:
        p.lines.append(line)
    objectives.problems(o, p.bad)


def _certify_problems(cfg: RunConfig, p: _Problems) -> None:
    c = cfg.certify
    p.one_of(c, "certify", "method", CERTIFY_METHODS)
    p.at_least(c, "certify", ("samples", "selection"), 1, "must be >= 1")
    p.at_least(c, "certify", ("examples",), 1, "must be >= 1 (or unset: all)")
    if not 0.0 < c.alpha < 0.5:
        p.bad("certify.alpha", c.alpha, "must be in (0, 0.5)")
    if c.sigma is not None and c.sigma <= 0:
        p.bad("certify.sigma", c.sigma, "must be > 0")
    if c.method == "gaussian" and c.sigma is None and cfg.objective.sigma <= 0:
        p.bad("objective.sigma", cfg.objective.sigma,
              "--certify gaussian needs a noise scale > 0 (--sigma or --certify-sigma)")
    for r in c.radii:
        try:
            ok = float(r) >= 0
        except ValueError:
            ok = False
        if not ok:
            p.bad("certify.radii", r, "expected numbers >= 0, e.g. --certify-radii 0 0.05 0.1")
    if c.method == "synonym" and not cfg.data.synonyms and cfg.data.task != "synthetic":
        p.bad("data.synonyms", cfg.data.synonyms,
              "--certify synonym needs a neighbour map: pass --synonyms PATH_OR_URL")


def _data_problems(d: DataConfig, p: _Problems) -> None:
    for key, accepted, what in (("task", TASKS, "tasks"), ("augment", AUGMENTATIONS, ""),
                                ("data_format", DATA_FORMATS, "formats")):
        p.one_of(d, "data", key, accepted, what)
    if d.augment == "synonym" and not d.synonyms and d.task != "synthetic":
        p.bad("data.synonyms", d.synonyms, "--augment synonym needs a neighbour map: pass --synonyms PATH_OR_URL")
    p.at_least(d, "data", ("synthetic_misalignment",), 0, "must be >= 0")
    if not 0.0 <= d.synonym_prob <= 1.0:
        p.bad("data.synonym_prob", d.synonym_prob, "must be in [0, 1]")
    p.at_least(d, "data", ("synthetic_train_size", "synthetic_eval_size"), 8, "must be >= 8")
    p.at_least(d, "data", ("max_train_examples", "max_eval_examples"), 1, "must be >= 1 (or unset)")


def _model_problems(m: ModelConfig, p: _Problems) -> None:
    p.at_least(m, "model", ("embedding_blocks",), 1, "must be >= 1 (or unset)")
    p.at_least(m, "model", ("max_length",), 8, "must be >= 8")
    if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
        p.bad("model.dropout", m.dropout, "must be in [0, 1)")


def _train_problems(t: TrainConfig, p: _Problems) -> None:
    p.one_of(t, "train", "eval_split", EVAL_SPLITS)
    p.one_of(t, "train", "dev_languages", DEV_LANGUAGES)
    p.one_of(t, "train", "preempt_signal", PREEMPT_SIGNALS)
    p.at_least(t, "train", ("preempt_grace",), 0, "must be >= 0 seconds (0: stop at once)")
    p.at_least(t, "train", ("max_steps", "micro_batch_size", "grad_accum", "eval_batch_size", "save_total_limit",
                            "max_bad_steps", "dist_timeout", "publish_timeout"), 1, "must be >= 1")
    p.at_least(t, "train", ("eval_steps", "save_steps"), 0, "must be >= 0 (0 disables)")
    p.at_least(t, "train", ("generalized_examples",), 1, "must be >= 1 (or unset: all)")
    if t.lr is not None and t.lr <= 0:
        p.bad("train.lr", t.lr, "must be > 0")
    if not t.log_interval >= 0:
        p.bad("train.log_interval", t.log_interval, "must be >= 0 seconds (0: a line every step)")
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.bad("train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    if not t.output_dir:
        p.bad("train.output_dir", t.output_dir, "must name a directory or URL")
    if t.overwrite and t.resume:
        p.bad("train.overwrite", t.overwrite, f"--overwrite replaces the run in --output-dir and --resume "
              f"{t.resume} continues one: choose one")
