"""The project's scripts (`benchmarks/`, `examples/`) loaded as modules, the way `python FOLDER/NAME.py` runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(folder: str, name: str) -> ModuleType:
    """ROOT/folder/name.py as a module (a fresh one each call).

    Its folder goes first on sys.path, as running the script puts it there, and stays: the scripts import their
    neighbours by name (gpu_timing, small_dsa_data, ...), some only inside the functions the tests call.
    """
    where = str(ROOT / folder)
    if where not in sys.path:
        sys.path.insert(0, where)
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
