"""``SlackSink``: warnings, advice, milestone forecasts and the end-of-training summary in Slack."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .._events import Event
from .._scorecard import scorecard_rows
from ._console import duration
from ._sender import DEFAULT_KINDS, DEFAULT_MILESTONES, HttpSink

__all__ = ["SlackSink", "slack_payload"]

_ICONS = {"warning": ":warning:", "critical": ":rotating_light:"}
_MAX_FIELDS = 10  # Slack's limit per section


class SlackSink(HttpSink):
    """Post to a Slack channel through an incoming webhook.

    By default: every warning and advice, one forecast at 25%, 50% and 75% of the run, and
    the end-of-training summary (forecast against the loss reached). The URL comes from
    ``webhook_url`` or the ``LOSSFORECAST_SLACK_WEBHOOK`` environment variable; it is never
    logged. Without one the sink logs one info message and stays off. Incoming webhooks
    cannot choose the channel, user name or icon: the webhook decides them.

    Parameters
    ----------
    webhook_url : str, optional
        ``https://hooks.slack.com/services/...``; default from ``LOSSFORECAST_SLACK_WEBHOOK``.
    run_name : str, optional
        Label of the run in each message.
    kinds : iterable of {'forecast', 'warning', 'advice', 'summary'}, optional
        Posted every time. Default ``('warning', 'advice', 'summary')``.
    milestones : iterable of float, optional
        Fractions of the run at which one forecast is posted. Default (0.25, 0.5, 0.75).
    **options
        Sending options (``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``max_queue``, ``dedup_window``), see :class:`~lossforecast.sinks.HttpSink`.

    Examples
    --------
    >>> sink = SlackSink(None)   # no URL and no LOSSFORECAST_SLACK_WEBHOOK: off
    >>> sink.enabled
    False
    """

    def __init__(
        self,
        webhook_url: str | None = None,
        *,
        run_name: str | None = None,
        kinds: Iterable[str] = DEFAULT_KINDS,
        milestones: Iterable[float] = DEFAULT_MILESTONES,
        **options,
    ) -> None:
        super().__init__(
            webhook_url,
            format=slack_payload,
            env_var="LOSSFORECAST_SLACK_WEBHOOK",
            run_name=run_name,
            kinds=kinds,
            milestones=milestones,
            _url_arg="webhook_url",
            **options,
        )


def slack_payload(event: Event, run_name: str | None = None) -> dict:
    """The Slack incoming-webhook body for ``event``: a ``text`` fallback and ``blocks``.

    Examples
    --------
    >>> event = Event("warning", "warning", 300, "loss spike: 4.1 vs 2.9")
    >>> slack_payload(event, "gpt-small")["text"]
    ':warning: lossforecast · gpt-small · Warning at step 300: loss spike: 4.1 vs 2.9'
    """
    if event.is_summary:
        icon = ":checkered_flag:"
    elif event.kind == "advice":
        icon = ":bulb:"
    else:
        icon = _ICONS.get(event.severity, ":crystal_ball:")
    head = " · ".join(["lossforecast"] + ([run_name] if run_name else []))
    title = _headline(event)
    blocks: list[dict] = [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"{icon} *{_escape(title)}* ({_escape(head)})\n{_escape(event.message)}",
            },
        }
    ]
    fields = [
        {"type": "mrkdwn", "text": f"*{_escape(label)}*\n{_escape(value)}"}
        for label, value in _fields(event)
    ]
    if fields:
        blocks.append({"type": "section", "fields": fields[:_MAX_FIELDS]})
    card = scorecard_rows(event.data) if event.is_summary else []
    if card:
        lines = "\n".join(f"{_escape(label)}: {_escape(text)}" for label, text in card)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": lines}})
    context = f"{event.kind} · {event.severity} · step {event.step}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    return {"text": f"{icon} {head} · {title}: {event.message}", "blocks": blocks}


def _headline(event: Event) -> str:
    if event.is_summary:
        return "Training finished"
    if event.kind == "forecast":
        target = event.data.get("target_step")
        if isinstance(target, (int, float)) and target > 0:
            return f"Forecast at {event.step / target:.0%} of the run (step {event.step})"
        return f"Forecast at step {event.step}"
    kind = "Advice" if event.kind == "advice" else event.severity.capitalize()
    return f"{kind} at step {event.step}"


def _fields(event: Event) -> list[tuple[str, str]]:
    """(label, value) pairs shown under the message."""
    data = event.data
    if event.kind != "forecast":
        return [(key, _number(value)) for key, value in data.items()]
    out = []
    if "reached_loss" in data:
        out.append(("Loss reached", _number(data["reached_loss"])))
    if "final_loss" in data:
        out.append(("Forecast final loss", _number(data["final_loss"])))
        coverage = data.get("coverage")
        label = f"{coverage:.0%} interval" if isinstance(coverage, float) else "Interval"
        out.append((label, f"{_number(data.get('low'))} - {_number(data.get('high'))}"))
    if isinstance(data.get("error"), float) and isinstance(data.get("rel_error"), float):
        out.append(("Error", f"{data['error']:+.4f} ({data['rel_error']:+.2%})"))
        out.append(("Forecast made at step", _number(data.get("observed_step"))))
    if "observed_loss" in data:
        out.append(("Loss now", _number(data["observed_loss"])))
    seconds = data.get("seconds_to_finish")
    if isinstance(seconds, (int, float)) and math.isfinite(seconds):
        out.append(("Time to finish", duration(seconds)))
    return out


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn reserves."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
