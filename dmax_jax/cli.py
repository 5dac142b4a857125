"""The one argparse parser of the project's command lines (train.py, decode.py, ``python -m
dmax_jax.eval``, ``python -m dmax_jax.serve``, tools/compare_torch.py).

Why one class: a bad flag must end with exit status 2 and one line naming it (never a traceback or a
20-line usage block), and argparse alone lets one input slip through: ``--flag=--`` (or ``--flag --``)
hands the action an empty *list* instead of a string, skipping its ``type`` check, so ``--seq-len=--``
reached the code as ``[]``.
"""

from __future__ import annotations

import argparse
from typing import Any


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line plus a pointer to ``--help``, and which refuses a lone
    ``--`` as the value of a flag that takes one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        if action.option_strings and action.nargs in (None, argparse.OPTIONAL) and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected a value, got '--'")
        return super()._get_values(action, arg_strings)
