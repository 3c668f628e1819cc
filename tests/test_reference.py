"""Reading the final losses of past runs (run summaries, saved events) as a reference."""

from __future__ import annotations

import json
import logging

import pytest

from lossforecast._reference import read_reference_losses


def test_reference_folder_of_summaries_forecasts_and_junk(tmp_path, caplog):
    summary = {"kind": "lossforecast-run-summary", "version": 2, "final_loss": 2.95, "params": {}}
    (tmp_path / "run-a.json").write_text(json.dumps(summary))
    event = {"kind": "forecast", "data": {"final": 1, "final_loss": 3.0, "reached_loss": 2.91}}
    (tmp_path / "events.jsonl").write_text(json.dumps(event) + "\n{cut sh\n")
    (tmp_path / "list.json").write_text(json.dumps([{"final_loss": 3.2}, {"final_loss": "x"}]))
    (tmp_path / "corrupt.json").write_text('{"final_loss": 2.')
    (tmp_path / "foreign.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / ".tmp-partial.json").write_text('{"final_loss": 1.0')  # a write in progress
    (tmp_path / "notes.txt").write_text("final_loss: 1.0")
    with caplog.at_level(logging.WARNING, logger="lossforecast"):
        losses = read_reference_losses(tmp_path)
    # sorted by file name; the summary event gives its reached loss, not its forecast 3.0
    assert losses == [2.91, 3.2, 2.95]
    [record] = caplog.records
    message = record.getMessage()
    assert "skipped 3 of 5 reference file(s)" in message
    assert "corrupt.json" in message and "foreign.json" in message and "events.jsonl" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"final_loss": 2.5}', [2.5]),
        ('{"reached_loss": 2.4, "final_loss": 2.5}', [2.4]),
        ('{"data": {"final_loss": 2.6}}', [2.6]),
        ('[{"final_loss": 2.5}, {"final_loss": 2.7}, 3, null]', [2.5, 2.7]),
        ('{"final_loss": 2.5}\n\n{"final_loss": 2.7}\n', [2.5, 2.7]),
        ('{"final_loss": true}', []),
        ('{"final_loss": -1.0}', []),
        ('{"final_loss": "2.5"}', []),
        ('{"final_loss": NaN}', []),
    ],
)
def test_what_counts_as_a_final_loss(tmp_path, text, expected):
    path = tmp_path / "run.jsonl"
    path.write_text(text)
    assert read_reference_losses(path) == expected


def test_missing_path_and_unreadable_bytes_are_skipped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lossforecast"):
        assert read_reference_losses(tmp_path / "nowhere") == []
        (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
        assert read_reference_losses(tmp_path) == []
    first, second = (r.getMessage() for r in caplog.records)
    assert "does not exist" in first
    assert "skipped 1 of 1" in second and "bin.json (UnicodeDecodeError)" in second
