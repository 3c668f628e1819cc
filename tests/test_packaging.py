"""The built wheel (what `pip install .` installs) carries every package and data file."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("lossforecast-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.mark.parametrize(
    "member",
    [
        "lossforecast/priors.json",
        "lossforecast/_forecaster.py",
        "lossforecast/integrations/lightning.py",
        "lossforecast/integrations/transformers.py",
        "lossforecast/sinks/_slack.py",
    ],
)
def test_wheel_contains(wheel_names, member):
    assert member in wheel_names


def test_wheel_declares_the_console_script(wheel_names):
    assert any(n.endswith("entry_points.txt") for n in wheel_names)
