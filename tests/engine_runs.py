"""Launched by the deepspeed launcher in tests: several training runs in one set of ranks.

    deepspeed --num_gpus 2 tests/engine_runs.py OUT_DIR --ds-configs A.json B.json \
        --objectives erm pgd -- <train.py flags>

Every (ds_config, objective) pair trains into OUT_DIR/<ds_config stem>/<objective> with the
same flags, so one launch (one process-group start-up) serves many runs.
"""

import os
import sys

from dist_robust.cli import train_main


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[1:]
    split = rest.index("--")
    options, flags = rest[:split], rest[split + 1:]
    configs = options[options.index("--ds-configs") + 1: options.index("--objectives")]
    objectives = options[options.index("--objectives") + 1:]
    for ds_config in configs:
        stem = os.path.splitext(os.path.basename(ds_config))[0]
        for objective in objectives:
            code = train_main([*flags, "--deepspeed", ds_config, "--objective", objective,
                               "--output-dir", f"{out}/{stem}/{objective}"])
            if code:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
