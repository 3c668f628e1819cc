"""Helpers of the multi-process tests: a fake RAPL counter per rank and a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path

_TEARDOWN_ABORT = "terminate called without an active exception"

WATTS = (10.0, 20.0)  # fake power of rank 0 and rank 1


def fake_rapl(root: Path, watts: float) -> None:
    """A powercap folder whose package counter grows at ``watts`` (advanced by a thread).

    The counter file is replaced whole, as sysfs reads are atomic: never an empty read.
    """
    domain = root / "intel-rapl:0"
    domain.mkdir(parents=True)
    (domain / "name").write_text("package-0\n")
    (domain / "max_energy_range_uj").write_text(f"{2**40}\n")
    counter = domain / "energy_uj"
    counter.write_text("0\n")
    start = time.monotonic()

    def advance() -> None:
        while True:
            time.sleep(0.01)
            fresh = domain / "energy_uj.new"
            fresh.write_text(f"{int(watts * 1e6 * (time.monotonic() - start))}\n")
            os.replace(fresh, counter)

    threading.Thread(target=advance, daemon=True).start()


def measure_with_fake_rapl(out: Path, rank: int) -> None:
    """Make this rank's energy monitor read its own fake counter, sampled every 50 ms."""
    import functools

    import lossforecast.integrations._rank_energy as rank_energy

    root = out / f"powercap-rank{rank}"
    fake_rapl(root, WATTS[rank])
    rank_energy.open_energy_monitor = functools.partial(
        rank_energy.open_energy_monitor, interval=0.05, rapl_root=root
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(command: list[str], out: Path, env: dict[str, str]) -> tuple[dict, dict]:
    """Run ``command``, which trains on two gloo ranks that each write ``out/rank{r}.json``;
    the two results (skipped where torch.distributed has no gloo)."""
    import pytest
    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    proc = subprocess.run(
        command,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    results = [out / f"rank{r}.json" for r in (0, 1)]
    if proc.returncode != 0:
        why = [line for line in proc.stderr.splitlines() if "rror" in line or "terminate" in line]
        if all(r.exists() for r in results) and any(_TEARDOWN_ABORT in line for line in why):
            # Both ranks finished and wrote their results; one then aborted in process
            # teardown (seen 2 times in ~25 runs on a 2-core machine under extra load). This
            # is how gloo ends a process whose group was never destroyed
            # (pytorch/pytorch#190489); the HF rank script now destroys its group, but the
            # abort was too rare to show it gone (0 in 26 runs before the change). What the
            # test checks is in the results: say so, do not fail.
            warnings.warn(f"a rank aborted after training: {_TEARDOWN_ABORT}", stacklevel=2)
        else:  # the lines that say why, then the end of the output
            raise AssertionError("\n".join(why[:20]) + "\n...\n" + proc.stderr[-1500:])
    return tuple(json.loads(r.read_text()) for r in results)


def fit_back_to_back() -> None:
    """Let the background fitter refit after every new window, with no duty-cycle pause.

    The tests that use it are about a decision reaching every rank, not about the fitting
    cadence; a run of a few seconds must not depend on when the capped fits happen to land.
    """
    from lossforecast._background import BackgroundFitter

    BackgroundFitter.__init__.__kwdefaults__["max_duty"] = 1.0


def assert_stopped_together(main: dict, other: dict, mode: str, steps: int) -> None:
    """Both ranks ended at the same step, before ``steps``, on the main rank's decision.

    ``mode`` "stop": only the main rank (the one with a monitor) gives a stop reason;
    "prune": the other rank learned of the prune from the broadcast. Saving the checkpoint is
    each framework's own and is checked by its test.
    """
    assert main["global_step"] == other["global_step"] < steps  # no rank left hanging
    if mode == "stop":
        assert main["stop_reason"] and other["stop_reason"] is None
    else:
        assert main["pruned"] and other["pruned"]
