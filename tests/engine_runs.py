"""Launched by the deepspeed launcher in tests: several training runs in one set of ranks.

    deepspeed --num_gpus 2 tests/engine_runs.py OUT_DIR --ds-configs A.json B.json \
        --objectives erm pgd -- <train.py flags> [--then [--subdir NAME] <more flags>] ...

Every (ds_config, objective) pair trains into OUT_DIR/[NAME/]<ds_config stem>/<objective> with
the same flags, so one launch (one process-group start-up) serves many runs. Each ``--then``
adds a phase: for every pair, the phases run one after the other, each with the common flags
plus its own (``--resume auto`` to continue the same run, ``--subdir`` for a separate one).
"""

import os
import sys

from dist_robust.cli import leave, train_main


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[1:]
    split = rest.index("--")
    options, flags = rest[:split], rest[split + 1:]
    configs = options[options.index("--ds-configs") + 1: options.index("--objectives")]
    objectives = options[options.index("--objectives") + 1:]
    common, *phases = _split(flags, "--then")
    for ds_config in configs:  # every phase of one config before the next config: a ZeRO-3 engine
        stem = os.path.splitext(os.path.basename(ds_config))[0]  # leaves DeepSpeed's patches behind,
        for objective in objectives:  # which move later runs' floats in the last bits
            for phase in phases or [[]]:
                subdir = ""
                if "--subdir" in phase:
                    i = phase.index("--subdir")
                    subdir, phase = phase[i + 1], phase[:i] + phase[i + 2:]
                code = train_main([*common, *phase, "--deepspeed", ds_config, "--objective", objective,
                                   "--output-dir", os.path.join(out, subdir, stem, objective)])
                if code:
                    return code
    return 0


def _split(items: list[str], separator: str) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    for item in items:
        if item == separator:
            groups.append([])
        else:
            groups[-1].append(item)
    return groups


if __name__ == "__main__":
    sys.exit(leave(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")])))
