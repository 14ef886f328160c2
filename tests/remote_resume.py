"""Single-rank runs against an fsspec memory:// output directory, all in one process.

Prints one JSON line: the straight run's losses, the resumed run's losses, and what the
memory filesystem holds. Used by test_remote_storage.py.
"""

import json
import sys

import fsspec

from dist_robust.cli import leave, train_main
from dist_robust.run.faults import CRASH_ENV


def main(flags: list[str]) -> None:
    import os

    train_main([*flags, "--output-dir", "memory://runs/straight"])
    os.environ[CRASH_ENV] = "4"
    try:
        train_main([*flags, "--output-dir", "memory://runs/resumed", "--resume", "auto"])
        raise SystemExit("the injected crash did not happen")
    except RuntimeError as err:
        assert "injected crash" in str(err)
    del os.environ[CRASH_ENV]
    fs = fsspec.filesystem("memory")
    latest_after_crash = fs.cat("/runs/resumed/checkpoints/latest").decode()
    train_main([*flags, "--output-dir", "memory://runs/resumed", "--resume", "auto"])
    out = {
        "straight": json.loads(fs.cat("/runs/straight/results.json"))["train_losses"],
        "resumed": json.loads(fs.cat("/runs/resumed/results.json"))["train_losses"],
        "latest_after_crash": latest_after_crash,
        "files": sorted(p.split("/runs/resumed/", 1)[1] for p in fs.find("/runs/resumed")),
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
    leave(0)  # ends the process group, as the commands do
