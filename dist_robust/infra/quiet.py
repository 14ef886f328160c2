"""A quiet console: a run prints the project's own lines; what its libraries say goes to a log file.

DeepSpeed warns on every start of every process ("Setting accelerator to CPU", "get learning rate
before the scheduler has started"), prints a line when it loads a compiled op, and Python warnings
(torch's deprecations) repeat once per rank: about 25 lines around a two-rank run's own. Those go
to ``<output-dir>/logs/libraries-rank<R>.log`` instead; errors still reach the console, and
``--verbose`` shows everything as before. :func:`install` must run before DeepSpeed is imported
(``cli`` runs it on import), since DeepSpeed's first warning comes from its import.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator

LIBRARY_LOGGERS = ("DeepSpeed", "py.warnings")
_state = {"verbose": False, "file": None, "kept": []}


class _Aside(logging.Filter):
    """Below ERROR and not --verbose: into the log file (kept in memory until there is one), not the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"] or record.levelno >= logging.ERROR:
            return True
        _write(f"{record.levelname} {record.name}: {record.getMessage()}")
        return False


_ASIDE = _Aside()


_KEEP = 1000  # lines kept in memory until there is a file (a process that never opens one keeps no more)


def _write(line: str) -> None:
    if _state["file"] is not None:
        _state["file"].write(line.rstrip("\n") + "\n")
        _state["file"].flush()
    elif len(_state["kept"]) < _KEEP:
        _state["kept"].append(line)


# transformers' loading report (a new classification head "newly initialized", expected here) and its
# weight-loading and file-writing bars; read when transformers is imported, so set before it is.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def install() -> None:
    """Route the libraries' loggers and Python warnings aside (idempotent)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _ASIDE not in logger.filters:
            logger.addFilter(_ASIDE)
    logging.captureWarnings(True)


def set_verbose(verbose: bool) -> None:
    """``--verbose``: the libraries' lines on the console again (those kept so far are printed now)."""
    _state["verbose"] = verbose
    if verbose:
        for key, value in QUIET_ENV.items():
            if os.environ.get(key) == value:
                os.environ.pop(key)  # (for processes started later; this one's transformers may be imported)
        for line in _state["kept"]:
            print(line, file=__import__("sys").stderr)
        _state["kept"] = []


def to_file(path: str) -> None:
    """From now on the libraries' lines go to ``path`` (appended; what was kept so far first)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if _state["file"] is not None:
        _state["file"].close()
    _state["file"] = open(path, "a", encoding="utf-8")
    for line in _state["kept"]:
        _write(line)
    _state["kept"] = []


def log_path(output_mirror: str, rank: int) -> str:
    return os.path.join(output_mirror, "logs", f"libraries-rank{rank}.log")


@contextlib.contextmanager
def printed_aside() -> Iterator[None]:
    """What a library prints to stdout inside the block (DeepSpeed's "op built successfully") goes aside too."""
    if _state["verbose"]:
        yield
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        _write(f"stdout: {line}")
