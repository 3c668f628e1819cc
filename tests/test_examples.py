"""The runnable examples still run end to end (short runs, in a subprocess, offline)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "needs"),
    [
        ("plain_loop.py", "torch"),
        ("chargpt_lightning.py", "lightning"),
        ("chargpt_hf.py", "transformers"),
    ],
)
def test_example_runs_and_reports_the_forecast(script, needs, tmp_path):
    pytest.importorskip(needs)
    args = [sys.executable, str(EXAMPLES / script), "--steps", "60"]
    if script == "chargpt_lightning.py":
        args += ["--log-dir", str(tmp_path / "tb")]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stderr  # the console sink writes to stderr, as logging does
    assert "forecast at 75%" in summary and "final loss reached" in summary  # the scorecard
