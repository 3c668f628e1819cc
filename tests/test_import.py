"""The core imports without torch, lightning, transformers or optuna, and never loads them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKED = ("torch", "lightning", "pytorch_lightning", "transformers", "optuna")

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())

    import lossforecast
    import lossforecast.cli
    import lossforecast.__main__
    names = [m.name for m in pkgutil.walk_packages(lossforecast.__path__, "lossforecast.")
             if not m.name.startswith("lossforecast.integrations")]
    for name in names:
        importlib.import_module(name)
    import lossforecast.integrations
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    lazy = sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "tensorboard"))
    assert not lazy, lazy
    print("ok", len(names))
    """
).format(blocked=BLOCKED)


def test_core_imports_with_frameworks_blocked():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_public_names_are_exported():
    import lossforecast

    for name in lossforecast.__all__:
        assert hasattr(lossforecast, name), name
    assert "Forecaster" in lossforecast.__all__ and "backtest" in lossforecast.__all__
