"""Launched by the deepspeed launcher in tests: several training runs in one set of ranks.

    deepspeed --num_gpus 2 tests/engine_runs.py OUT_DIR --objectives erm pgd -- <train.py flags>

Each objective trains into OUT_DIR/<objective> with the same flags, so one launch (and one
process-group start-up) serves several runs.
"""

import sys

from dist_robust.cli import train_main


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[1:]
    split = rest.index("--")
    objectives, flags = rest[1:split], rest[split + 1:]
    flags = [f for f in flags if not f.startswith("--local_rank")]
    for objective in objectives:
        code = train_main([*flags, "--objective", objective, "--output-dir", f"{out}/{objective}"])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
