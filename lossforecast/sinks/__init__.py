"""Sinks: where lossforecast events are shown (console, TensorBoard, Slack, any JSON webhook)."""

from ._base import Sink
from ._console import ConsoleSink
from ._metrics import MetricsSink
from ._sender import HttpSink
from ._slack import SlackSink, slack_payload
from ._tensorboard import TensorBoardSink
from ._webhook import WebhookSink, json_payload

__all__ = [
    "ConsoleSink",
    "HttpSink",
    "MetricsSink",
    "Sink",
    "SlackSink",
    "TensorBoardSink",
    "WebhookSink",
    "json_payload",
    "slack_payload",
]
