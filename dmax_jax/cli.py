"""The one argparse parser of the project's command lines (train.py, decode.py, ``python -m
dmax_jax.eval``, ``python -m dmax_jax.serve``, tools/compare_torch.py).

Why one class: a bad flag must end with exit status 2 and one line naming it (never a traceback or a
20-line usage block), and argparse alone lets one input slip through: ``--flag=--`` (or ``--flag --``)
hands the action an empty *list* instead of a string, skipping its ``type`` check, so ``--seq-len=--``
reached the code as ``[]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
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


class OutputPathError(ValueError):
    """An output path (``--out``, ``--html``, ``run.out_dir`` ...) that cannot be written; the message
    names the flag or config key."""


def error_line(prog: str, message: str) -> str:
    """The one error-line format of every command: ``<command>: error: <what>``."""
    return f"{prog}: error: {message}"


def _blocking_file(path: Path) -> Path | None:
    """The first ancestor of ``path`` (or ``path`` itself) that exists but is not a directory."""
    for parent in reversed([path, *path.parents]):
        if parent.exists() and not parent.is_dir():
            return parent
        if not parent.exists():
            return None
    return None


def check_writable(flag: str, path: str | os.PathLike, *, directory: bool = False) -> Path:
    """Check, before any model is loaded, that ``path`` can be written: a file (``directory=False``)
    or a directory to create or fill. Why a probe file instead of ``os.access``: root passes every
    permission check, yet a read-only mount or a parent that is a regular file still fails the
    write — hours later, after the work is done. Creates nothing that stays behind."""
    p = Path(path).absolute()
    if directory and p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {path} exists and is not a directory")
    blocker = _blocking_file(p if directory else p.parent)
    if blocker is not None:
        raise OutputPathError(f"{flag} {path}: cannot write there: {blocker} is a file, not a directory")
    if not directory and p.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; give a file path")
    if not directory and p.exists() and not os.access(p, os.W_OK):
        raise OutputPathError(f"{flag} {path}: the file exists and is not writable")
    existing = next(d for d in (p if directory else p.parent, *p.parents) if d.exists())
    try:
        fd, probe = tempfile.mkstemp(prefix=".dmax-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None
    return p
