"""Checkpoint names: tags, the pointer files that name them, and the checks on a name read from a store.

Shared by the checkpoint store (:mod:`dist_robust.run.checkpointing`) and the publisher that copies its
checkpoints to the output directory (:mod:`dist_robust.run.publishing`).
"""

from __future__ import annotations

import os
import re

LATEST = "latest"  # pointer: the newest complete periodic checkpoint
BEST = "best"  # pointer: the checkpoint with the best source-language dev accuracy
BEST_PREFIX = "best-"
MANIFEST = "manifest.json"  # written last in every tag: each file's size and sha256


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, altered, or not trusted."""


# What a pointer file may name: a tag of the form dist-robust writes. A pointer is read from a store
# (or a restored Ray checkpoint) and joined into paths that are deleted and listed; anything else
# (``../../victim``, an absolute path) is refused before any use.
_TAG = re.compile(r"(?:step|best)-[0-9]{8}")

def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def best_tag(step: int) -> str:
    return f"{BEST_PREFIX}{step:08d}"


def checked_tag(tag: str, source: str) -> str:
    """``tag`` as read from the pointer file ``source``, when it is a tag of dist-robust's own form.

    Raises :class:`CheckpointError` otherwise, before the name is joined into any path.
    """
    if not _TAG.fullmatch(tag):
        raise CheckpointError(f"{source} names {tag[:80]!r}, which is not a dist-robust checkpoint tag "
                              f"(step-NNNNNNNN or best-NNNNNNNN): refused, nothing was read or deleted. Only "
                              f"resume from storage you control; --resume <checkpoints dir>/<tag> names a "
                              f"checkpoint directly")
    return tag


def one_segment(tag: str) -> str:
    """A tag given as a path's last segment (``--resume DIR/TAG``): one plain name, never a way out of its root."""
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag:
        raise CheckpointError(f"checkpoint tag {tag[:80]!r}: expected one directory name")
    return tag


def read_pointer(path: str) -> str | None:
    """The tag a local pointer file names (checked: :func:`checked_tag`), or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return checked_tag(f.read().strip(), path)
