"""Fixtures shared by the whole suite."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """Load a repository script (``"benchmarks/accuracy.py"``) as a module.

    Scripts are not in the package; their own folder is on ``sys.path`` while one loads, so
    it can import its siblings as it does when run. The module is registered in
    ``sys.modules`` (under a name no real module has), as dataclasses defined in it need.
    """

    def load(relative: str) -> ModuleType:
        path = ROOT / relative
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        return module

    return load
