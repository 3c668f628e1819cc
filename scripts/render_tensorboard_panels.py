"""Plot the lossforecast TensorBoard panels of a run folder into a PNG (no browser needed).

Reads the event files ``TensorBoardSink`` wrote (the run folder and its
``lossforecast_trajectory/step_*`` sub-runs) and draws the two custom-scalars charts:

1. the final-loss forecast as a line with its interval as the band (the Margin chart), with
   the loss reached at the end when the run wrote its summary;
2. the observed smoothed loss with every predicted trajectory (the Multiline chart).

Usage::

    python scripts/render_tensorboard_panels.py RUN_DIR [-o panels.png]

Needs ``tensorboard`` and ``matplotlib`` (``pip install "lossforecast[tensorboard,plot]"``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PREFIX = "lossforecast/"
TRAJECTORY_RUN = "lossforecast_trajectory"


def _scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``tag -> (steps, values)`` of every ``lossforecast/`` scalar in one run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.fspath(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith(PREFIX):
            events = acc.Scalars(tag)
            out[tag[len(PREFIX) :]] = ([e.step for e in events], [e.value for e in events])
    return out


def load_panels(run_dir: str | os.PathLike) -> dict:
    """Both panels' data: ``{"run": {tag: (steps, values)}, "trajectories": [(step, {...})]}``."""
    run_dir = Path(run_dir)
    trajectories = []
    sub = run_dir / TRAJECTORY_RUN
    if sub.is_dir():
        for folder in sorted(p for p in sub.iterdir() if p.is_dir()):
            trajectories.append((int(folder.name.rsplit("_", 1)[-1]), _scalars(folder)))
    return {"run": _scalars(run_dir), "trajectories": trajectories}


def render(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Draw both panels of ``run_dir`` into the PNG ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_panels(run_dir)
    run = data["run"]
    if "forecast/final_loss" not in run:
        raise SystemExit(f"no lossforecast scalars in {run_dir}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)

    steps, loss = run["forecast/final_loss"]
    left.fill_between(
        steps,
        run["forecast/low"][1],
        run["forecast/high"][1],
        alpha=0.25,
        color="C0",
        label="interval",
    )
    left.plot(steps, loss, color="C0", marker="o", ms=3, label="forecast of the final loss")
    if "summary/reached_loss" in run:
        left.axhline(
            run["summary/reached_loss"][1][-1], color="k", ls="--", lw=1, label="loss reached"
        )
    left.set(title="lossforecast: final loss forecast", xlabel="step", ylabel="loss")
    left.legend(loc="upper right")

    if "observed/smoothed_loss" in run:
        right.plot(*run["observed/smoothed_loss"], color="k", lw=2, label="observed (smoothed)")
    cmap = plt.get_cmap("viridis")
    n = len(data["trajectories"])
    for i, (made_at, tags) in enumerate(data["trajectories"]):
        if "trajectory" not in tags:
            continue
        color = cmap(i / max(n - 1, 1))
        right.plot(*tags["trajectory"], color=color, lw=1.2, label=f"predicted at step {made_at}")
        if i == n - 1 and "trajectory_low" in tags:
            right.fill_between(
                tags["trajectory"][0],
                tags["trajectory_low"][1],
                tags["trajectory_high"][1],
                color=color,
                alpha=0.2,
            )
    right.set(title="lossforecast: predicted trajectory vs observed", xlabel="step", ylabel="loss")
    right.legend(loc="upper right", fontsize="small", ncol=2)

    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run folder with the lossforecast event files")
    parser.add_argument("-o", "--out", default="tensorboard_panels.png", help="PNG to write")
    args = parser.parse_args(argv)
    print(render(args.run_dir, args.out))


if __name__ == "__main__":
    main()
