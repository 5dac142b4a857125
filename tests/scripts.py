"""Load the repository's command-line scripts (decode.py, train.py, tools/*.py) as modules, so tests
call their ``main`` in-process instead of spawning a Python per case."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """A fresh module object for ``REPO / relpath`` (each call re-executes the file)."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
