"""Compiled ops that stay compiled: one build cache per Python environment, built with its own tools.

DeepSpeed compiles some ops on first use (on CPU hosts, its shared-memory all-reduce, about a
minute) with torch's JIT, into ``~/.cache/torch_extensions`` by default: one folder for every
environment of the user. Two checkouts (or a set-up run with the system's ``ninja`` and a training
run with the environment's) then write different build commands into the same folder, and ninja
rebuilds the op each time the other one ran. Here every environment builds into its own folder
under ``sys.prefix``, with the environment's own tools first on ``PATH``, from set-up
(``python -m dist_robust.infra.toolchain``, which the Makefile runs) to every run.
"""

from __future__ import annotations

import hashlib
import os
import sys

PREBUILT_OPS = ("ShareMemCommBuilder",)  # what a CPU run compiles on its first start


def build_cache_dir() -> str:
    """This environment's torch-extensions folder (named by its prefix as the interpreter sees it)."""
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    return os.path.join(sys.prefix, "torch_extensions", key)


OWNER_ENV = "DIST_ROBUST_EXTENSIONS_FOR"  # the environment a TORCH_EXTENSIONS_DIR was chosen here for


def use_environment_build_cache() -> None:
    """Point torch's JIT at :func:`build_cache_dir` and put this interpreter's tools first on ``PATH``.

    A ``TORCH_EXTENSIONS_DIR`` the user set stands. One this module set for another environment
    (inherited by a process of another interpreter: a launcher started from one environment running
    ranks with another's Python) is replaced, since the two build commands differ and would rebuild
    the op over each other in one folder. Call before DeepSpeed loads an op.
    """
    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    if given is None or os.environ.get(OWNER_ENV) not in (None, sys.prefix):
        os.environ["TORCH_EXTENSIONS_DIR"] = build_cache_dir()
        os.environ[OWNER_ENV] = sys.prefix
    tools = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [tools]:
        os.environ["PATH"] = os.pathsep.join([tools, *(p for p in path if p != tools)])


def build_ops() -> list[str]:
    """Compile the ops a run on this host loads first (none on GPU hosts); return their names."""
    use_environment_build_cache()
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in PREBUILT_OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None:
            builder.load()
            built.append(name)
    return built


if __name__ == "__main__":
    names = build_ops()
    print(f"compiled {', '.join(names) or 'nothing (no op to prebuild here)'} into {os.environ['TORCH_EXTENSIONS_DIR']}")
