"""Tests for lossforecast.sinks._tensorboard: event files read back with TensorBoard itself."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from lossforecast._events import Event, EventBus
from lossforecast.sinks import TensorBoardSink
from lossforecast.sinks._tensorboard import TRAJECTORY_RUN


def read(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def series(acc: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def layout(acc: EventAccumulator) -> layout_pb2.Layout:
    assert metadata.CONFIG_SUMMARY_TAG in acc.PluginTagToContent(metadata.PLUGIN_NAME)
    (tensor,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(tensor.tensor_proto.string_val[0])


def check_run(acc: EventAccumulator, events: list[Event]) -> None:
    """Every forecast number of ``events`` is in the run, at the event's step."""
    forecasts = [e for e in events if e.kind == "forecast" and not e.is_summary]
    steps = [e.step for e in forecasts]
    for key, tag in [
        ("final_loss", "forecast/final_loss"),
        ("low", "forecast/low"),
        ("high", "forecast/high"),
        ("observed_loss", "observed/smoothed_loss"),
        ("residual", "forecast/residual"),
        ("seconds_to_finish", "seconds_to_finish"),
    ]:
        got_steps, values = series(acc, "lossforecast/" + tag)
        assert got_steps == steps, tag
        np.testing.assert_allclose(values, [e.data[key] for e in forecasts], rtol=1e-6)
    summary = events[-1]
    assert series(acc, "lossforecast/summary/reached_loss")[0] == [summary.step]
    np.testing.assert_allclose(
        series(acc, "lossforecast/summary/error")[1], [summary.data["error"]], rtol=1e-6
    )
    assert series(acc, "lossforecast/events/warnings") == ([400], [1.0])
    assert series(acc, "lossforecast/events/advice") == ([700], [1.0])
    (category,) = layout(acc).category
    margin, multiline = category.chart
    assert list(margin.margin.series) == [
        layout_pb2.MarginChartContent.Series(
            value="lossforecast/forecast/final_loss",
            lower="lossforecast/forecast/low",
            upper="lossforecast/forecast/high",
        )
    ]
    assert list(multiline.multiline.tag) == [
        "^lossforecast/observed/smoothed_loss$",
        "^lossforecast/trajectory$",
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of `log_dir` and `writer`"),
        ({"log_dir": "x", "writer": object()}, ValueError, "exactly one of"),
        ({"writer": object()}, TypeError, "`writer` must have an add_scalar method, got object"),
        (
            {"log_dir": "x", "trajectory_every": 0.0},
            ValueError,
            r"`trajectory_every` must be in \(0, 1\]",
        ),
        ({"log_dir": "x", "flush_secs": -1}, ValueError, "`flush_secs` must be a positive number"),
    ],
)
def test_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        TensorBoardSink(**kwargs)


def test_missing_tensorboard_suggests_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    with pytest.raises(ImportError, match=r'pip install "lossforecast\[tensorboard\]"'):
        TensorBoardSink(tmp_path)


def test_standalone_run_reads_back_with_tags_values_and_layout(tmp_path, events):
    sink = TensorBoardSink(tmp_path / "run")
    bus = EventBus([sink])
    for event in events:
        bus.emit(event)
    bus.close()
    assert bus.disabled == []
    check_run(read(tmp_path / "run"), events)


def test_trajectories_go_to_sub_runs_that_share_one_tag(tmp_path, events):
    sink = TensorBoardSink(tmp_path / "run", trajectory_every=0.25)
    for event in events:
        sink.write(event)
    sink.close()
    subs = sorted((tmp_path / "run" / TRAJECTORY_RUN).iterdir())
    # forecasts at 200..900, target step 999: written at 200, then at least 250 steps later
    assert [p.name for p in subs] == ["step_00000200", "step_00000500", "step_00000800"]
    by_step = {e.step: e.trajectory for e in events if e.trajectory is not None}
    for folder in subs:
        acc = read(folder)
        traj = by_step[int(folder.name[5:])]
        for tag, values in [("", traj.loss), ("_low", traj.low), ("_high", traj.high)]:
            steps, got = series(acc, f"lossforecast/trajectory{tag}")
            assert steps == list(traj.steps)
            np.testing.assert_allclose(got, values, rtol=1e-6)
        assert metadata.CONFIG_SUMMARY_TAG not in acc.Tags()["tensors"]  # layout once per run


def test_nothing_is_written_before_the_first_event(tmp_path):
    TensorBoardSink(tmp_path / "run").close()
    assert not (tmp_path / "run").exists()


def test_writes_into_a_torch_summary_writer(tmp_path, events):
    tb = pytest.importorskip("torch.utils.tensorboard")
    writer = tb.SummaryWriter(log_dir=str(tmp_path / "lightning_logs" / "version_0"))
    writer.add_scalar("train_loss", 3.0, 0)  # the user's own logging, in the same run
    sink = TensorBoardSink(writer=writer, trajectory_every=0.5)
    assert sink.log_dir == writer.log_dir
    for event in events:
        sink.write(event)
    sink.close()
    writer.add_scalar("train_loss", 2.0, 999)  # the sink flushed but did not close the writer
    writer.close()
    acc = read(writer.log_dir)
    check_run(acc, events)
    assert series(acc, "train_loss") == ([0, 999], [3.0, 2.0])
    subs = sorted(p.name for p in (Path(writer.log_dir) / TRAJECTORY_RUN).iterdir())
    assert subs == ["step_00000200", "step_00000700"]


class RecordingWriter:
    """A writer with only ``add_scalar`` (no log_dir, no layout support)."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_minimal_writer_gets_scalars_and_one_message_each(caplog, events):
    writer = RecordingWriter()
    sink = TensorBoardSink(writer=writer)
    with caplog.at_level(logging.INFO, logger="lossforecast.sinks._tensorboard"):
        for event in events:
            sink.write(event)
        sink.close()
    tags = {t for t, _, _ in writer.scalars}
    assert "lossforecast/forecast/final_loss" in tags and "lossforecast/trajectory" not in tags
    messages = [r.getMessage() for r in caplog.records]
    assert sum("custom-scalars layout" in m for m in messages) == 1
    assert sum("trajectories are off" in m for m in messages) == 1


def test_render_script_plots_the_panels(tmp_path, events, load_script):
    pytest.importorskip("matplotlib")
    sink = TensorBoardSink(tmp_path / "run")
    for event in events:
        sink.write(event)
    sink.close()
    script = load_script("scripts/render_tensorboard_panels.py")
    data = script.load_panels(tmp_path / "run")
    assert [made_at for made_at, _ in data["trajectories"]] == list(range(200, 1000, 100))
    assert data["run"]["forecast/final_loss"][0] == list(range(200, 1000, 100))
    out = script.render(tmp_path / "run", tmp_path / "panels.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
