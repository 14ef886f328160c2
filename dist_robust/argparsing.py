"""The argument parser every ``dist-robust`` command uses: readable help, short errors with suggestions."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn


def plain(doc: str | None) -> str | None:
    """A docstring as terminal text: reStructuredText's ``literal`` marks become `literal`."""
    return None if doc is None else re.sub(r"``(.+?)``", r"`\1`", doc)


class Parser(argparse.ArgumentParser):
    """``argparse`` with help text shown as written, and errors that fit on a screen.

    A misspelled option gets the closest known ones (``--epsilonn`` -> ``--epsilon``) and a
    one-line usage, instead of the full option list before the one line that matters.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs["description"] = plain(kwargs.get("description"))
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hints = []
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [s for action in self._actions for s in action.option_strings]
            for arg in unknown.group(1).split():
                name = arg.split("=", 1)[0]
                if not name.startswith("-"):
                    continue
                close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
                if close:
                    hints.append(f"{name}: did you mean {' or '.join(close)}?")
        print(f"usage: {self.prog} [options] ...  (--help lists every option)", file=sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        for hint in hints:
            print(f"  {hint}", file=sys.stderr)
        sys.exit(2)
