"""The only module that imports fsspec: read, write, upload and download by URI.

Everything else passes locations around as plain strings. A location without a scheme is
a local path. DeepSpeed can only write to a local directory, so remote checkpoints are
staged locally and then *published*: files first, the ``latest`` pointer last, so a reader
never sees a half-written checkpoint as the newest one.
"""

from __future__ import annotations

import logging
import os
import posixpath

import fsspec

log = logging.getLogger(__name__)


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URLs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI with forward slashes (os.path for local paths)."""
    if is_local(uri):
        return os.path.join(uri, *parts)
    return posixpath.join(uri, *parts)


def canonical(uri: str) -> str:
    """One spelling per location: resolved absolute path for local files, the URL otherwise."""
    if is_local(uri):
        return os.path.realpath(local_path(uri))
    fs, path = _fs(uri)
    return fs.unstrip_protocol(path)


def _fs(uri: str):
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.isdir(path)


def file_sha256(path: str) -> str:
    """The sha256 of a local file, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_text(uri: str) -> str:
    with fsspec.open(uri, "r", encoding="utf-8") as f:
        return f.read()


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    """Write text, atomically: a reader sees the old content or the new, never a part.

    Local files are written beside the target and renamed over it; an object store's single
    upload is atomic by itself. Parent directories are created.
    """
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    fs, path = _fs(uri)
    if posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(text)


def makedirs(uri: str) -> None:
    fs, path = _fs(uri)
    fs.makedirs(path, exist_ok=True)


def listdir(uri: str) -> list[str]:
    """Base names of the entries of a directory ([] if it does not exist)."""
    fs, path = _fs(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def upload_dir(local_dir: str, uri: str, skip: tuple[str, ...] = ()) -> None:
    """Copy a local directory tree to a (remote) URI, leaving out top-level files named in ``skip``."""
    fs, path = _fs(uri)
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = path if rel == "." else posixpath.join(path, *rel.split(os.sep))
        fs.makedirs(target, exist_ok=True)
        for name in files:
            if not (rel == "." and name in skip):
                fs.put_file(os.path.join(root, name), posixpath.join(target, name))


def upload_file(local_path: str, uri: str) -> None:
    fs, path = _fs(uri)
    fs.put_file(local_path, path)


# Errors that retrying cannot fix: wrong credentials or paths, and programming errors.
_PERMANENT = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, TypeError, ValueError,
              KeyError, AttributeError)


def with_retries(work, budget_s: float, what: str):
    """``work()``, retried with exponential backoff (1 s doubling to 30 s) for up to ``budget_s`` seconds.

    For object-store calls: connection failures and server errors are retried, permanent
    errors (see ``_PERMANENT``) raised at once; the last error is raised when time runs out.
    """
    import tenacity

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(budget_s), wait=tenacity.wait_exponential(multiplier=1, min=1, max=30),
        retry=tenacity.retry_if_not_exception_type(_PERMANENT), reraise=True,
        before_sleep=lambda state: log.info("%s failed (%s), attempt %d; retrying", what,
                                            state.outcome.exception(), state.attempt_number))
    return retrying(work)


def safe_segment(name: str, limit: int = 100) -> str:
    """A name (an MLflow experiment's, a sweep's) as one harmless folder name: ``/Shared/x`` -> ``Shared-x``,
    ``../../x`` -> ``x``; letters, digits, ``.``, ``_`` and ``-`` only, at most ``limit`` characters."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:limit].strip(".-")
    return safe or "unnamed"


class UnsafePathError(ValueError):
    """A name read from a store that would lead outside the folder it belongs in, or a shared folder
    another user could have prepared."""


def private_dir(*parts: str) -> str:
    """``<temp>/dist-robust-<uid>/<parts>``, the top folder this user's own and closed to others (0700).

    Fixed names under a shared temporary directory can be created first by another user, as a
    symlink or an open folder in which checkpoint files could be swapped before they are hashed.
    The top folder is created 0700 if missing; a symlink there, or one owned by someone else or
    open to others, raises :class:`UnsafePathError`.
    """
    import stat
    import tempfile

    top = os.path.join(tempfile.gettempdir(), f"dist-robust-{os.getuid()}")
    try:
        os.mkdir(top, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(top)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() \
            or info.st_mode & 0o077:
        raise UnsafePathError(f"{top} is not a private folder of this user (a symlink, another owner, or open to "
                              f"others: mode {stat.S_IMODE(info.st_mode):o}); remove it, or set --staging-dir / "
                              f"scratch_dir to a folder of your own")
    path = os.path.join(top, *parts)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def inside(local_dir: str, rel: str, source: str) -> str:
    """``local_dir/rel`` for a slash-separated ``rel`` read from ``source``, when it stays inside ``local_dir``.

    Keys are legal in object stores that no file name is: ``..`` or empty segments, a leading
    slash, backslashes. Such a key (and one that reaches out through a symlink already in
    ``local_dir``) raises :class:`UnsafePathError` before anything is written.
    """
    parts = rel.split("/")
    if not rel or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"{source}: the key {rel[:200]!r} is not a plain relative path; refused, nothing "
                              f"was written outside {local_dir}")
    dest = os.path.join(local_dir, *parts)
    root = os.path.realpath(local_dir)
    if os.path.commonpath([root, os.path.realpath(dest)]) != root:
        raise UnsafePathError(f"{source}: the key {rel[:200]!r} leads outside {local_dir}; refused")
    return dest


def download_dir(uri: str, local_dir: str) -> None:
    """Copy a (remote) directory tree into a local directory; every key must stay inside it (:func:`inside`).

    All keys are checked before the first file is written.
    """
    fs, path = _fs(uri)
    prefix = path.rstrip("/")
    plan = [(remote, inside(local_dir, remote[len(prefix):].lstrip("/"), uri)) for remote in fs.find(prefix)]
    for remote, dest in plan:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(remote, dest)


def remove(uri: str) -> None:
    """Delete a file or directory tree if it exists."""
    fs, path = _fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
