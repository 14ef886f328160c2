"""What the command line names must exist before any process starts: models, languages, files.

``validation.validate`` checks the config's values; this module checks what they point at,
cheaply and without loading anything: the model is a built-in config, a folder with a
``config.json``, or a hub name that is cached or can be fetched (a quick connection test, not
a minute of retries); every evaluation language is one the task has; every file named (a
training file, a synonym map, each language's dev file under ``--data-dir``) is there; a real
task without ``--data-dir`` needs the hub or its cache. Every problem is reported at once, as
a :class:`~dist_robust.config.run_config.ConfigError` naming the key, the value and the fix.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from dist_robust.infra import storage
from dist_robust.config.run_config import BUILTIN_MODELS, ConfigError, RunConfig
from dist_robust.data.tasks import task_languages

_HUB_TIMEOUT_S = 3.0
_reachable: dict[str, bool] = {}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable() -> bool:
    """Whether the hub answers a TCP connection within a few seconds (once per process); False when offline mode is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if host not in _reachable:
        try:
            socket.create_connection((host, port), timeout=_HUB_TIMEOUT_S).close()
            _reachable[host] = True
        except OSError:
            _reachable[host] = False
    return _reachable[host]


def _looks_like_path(name: str) -> bool:
    """A name meant as a folder: explicit (``./``, ``/``, ``~``), deeper than ``org/name``, or under an existing folder."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str) or \
            isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is answered below
        return False


def model_problem(key: str, name: str, needs_config: bool = True) -> str | None:
    """What is wrong with a ``--model`` / ``--tokenizer`` value, or None."""
    from dist_robust.config.run_config import _key_desc

    where = f"{_key_desc(key)} = {name!r}"
    if key == "model.name" and name in BUILTIN_MODELS:
        return None
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        wanted = "config.json" if needs_config else "tokenizer_config.json"
        if not os.path.isfile(os.path.join(path, wanted)) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            return (f"{where}: the folder has no {wanted}, so it is not a saved {'model' if needs_config else 'tokenizer'}"
                    f"; give a folder written by save_pretrained (a run's exported model/ folder, or "
                    f"dist-robust import-model DIR)")
        return None
    if os.path.exists(path):
        return f"{where}: a file; expected a model folder, a hub name or a built-in config"
    builtins = f"built-in configs: {', '.join(BUILTIN_MODELS)}" if key == "model.name" else "or a local folder"
    if _looks_like_path(name) or "://" in name:
        return f"{where}: no such folder ({builtins})"
    if _in_hub_cache(name):
        return None
    if not hub_reachable():
        return (f"{where}: not a local folder, not in the Hugging Face cache, and the hub ({hub_endpoint()}) cannot be "
                f"reached from here; {builtins}; offline, a multilingual encoder with XLM-R's vocabulary comes from "
                f"dist-robust import-model DIR (then --model DIR)")
    from huggingface_hub import file_exists

    try:
        if file_exists(name, "config.json" if needs_config else "tokenizer_config.json"):
            return None
    except Exception as err:  # noqa: BLE001 - an invalid name, a gated or private repo, ...
        return f"{where}: not a model the hub serves ({type(err).__name__}); {builtins}"
    return f"{where}: the hub has no such model; {builtins}"


def _language_problems(cfg: RunConfig) -> list[str]:
    d = cfg.data
    known = task_languages(d.task)
    problems = []
    unknown = [lang for lang in d.languages if lang not in known]
    if unknown:
        problems.append(f"data.languages (--languages) = {' '.join(unknown)}: {d.task} has no such language; "
                        f"accepted: {' '.join(known)}")
    if d.source_language not in known:
        problems.append(f"data.source_language (--source-language) = {d.source_language!r}: {d.task} has no such "
                        f"language; accepted: {' '.join(known)}")
    return problems


def _file_problems(cfg: RunConfig) -> list[str]:
    from dist_robust.data.layout import describe, find_split_file

    d, problems = cfg.data, []
    for key, flag, value in (("train_file", "--train-file", d.train_file), ("synonyms", "--synonyms", d.synonyms)):
        if value and not _exists(value):
            problems.append(f"data.{key} ({flag}) = {value!r}: no such file")
    if d.task == "synthetic":
        return problems
    if d.data_dir is None:
        if not hub_reachable() and not _dataset_cached(d.task, d.cache_dir):
            problems.append(f"data.data_dir (--data-dir) = None: {d.task} then comes from the hub, which cannot be "
                            f"reached from here ({hub_endpoint()}), and is not in the datasets cache; offline, pass "
                            f"--data-dir DIR with {d.task}/{{lang}}/{{split}}.tsv files and --train-file")
        return problems
    if not _exists(d.data_dir):
        return problems + [f"data.data_dir (--data-dir) = {d.data_dir!r}: no such directory"]
    langs = list(d.languages) or list(task_languages(d.task))
    for lang in dict.fromkeys([d.source_language, *langs]):
        if lang in task_languages(d.task) and find_split_file(d.data_dir, d.task, lang, "dev") is None:
            problems.append(f"data.data_dir (--data-dir) = {d.data_dir!r}: no dev file for {lang!r} "
                            f"({describe(d.data_dir, d.task, lang)}); expected {d.task}/{lang}/dev.tsv (or .jsonl, "
                            f".parquet, or XTREME's {d.task}/dev-{lang}.tsv), or leave {lang} out of --languages")
    return problems


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except Exception:  # noqa: BLE001 - an unreachable store or a bad URL: it is not there for this run
        return False


def _dataset_cached(task: str, cache_dir: str | None) -> bool:
    from dist_robust.data.hub import HUB_SCHEMAS

    root = cache_dir or os.environ.get("HF_DATASETS_CACHE") or \
        os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "datasets")
    return os.path.isdir(os.path.join(root, HUB_SCHEMAS[task].name.replace("/", "___")))


def _tracking_problems(cfg: RunConfig) -> list[str]:
    from dist_robust.run.tracking import access_problem, resolve_uri

    uri = resolve_uri(cfg.tracking.mlflow_uri)
    problem = access_problem(uri) if uri else None
    return [f"tracking.mlflow_uri (--mlflow-uri): {problem}"] if problem else []


def input_problems(cfg: RunConfig) -> list[str]:
    """Every problem with what the config names (models, languages, files, the tracking server's
    credentials), found without loading them."""
    problems = _language_problems(cfg) + _tracking_problems(cfg)
    for key, name, needs_config in (("model.name", cfg.model.name, True), ("model.tokenizer", cfg.model.tokenizer, False)):
        problem = model_problem(key, name, needs_config) if name else None
        if problem:
            problems.append(problem)
    return problems + _file_problems(cfg)


def check_inputs(cfg: RunConfig) -> None:
    """Raise one :class:`ConfigError` listing every problem of :func:`input_problems`."""
    problems = input_problems(cfg)
    if problems:
        raise ConfigError(problems)
