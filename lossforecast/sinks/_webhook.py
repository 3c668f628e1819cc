"""``WebhookSink``: events as generic JSON to any URL (or any schema, via ``format``)."""

from __future__ import annotations

from collections.abc import Iterable

from .._events import Event
from ._sender import DEFAULT_KINDS, DEFAULT_MILESTONES, HttpSink, PayloadFormatter

__all__ = ["WebhookSink", "json_payload"]


class WebhookSink(HttpSink):
    """Post events as JSON to a webhook, through the same background sender as ``SlackSink``.

    The body is :func:`json_payload` unless ``format`` says otherwise, so a chat service
    with its own schema needs only a function, e.g. Discord:
    ``WebhookSink(url, format=lambda e, run: {"content": e.message})``.

    Parameters
    ----------
    url : str, optional
        Where to post; default from the ``LOSSFORECAST_WEBHOOK_URL`` environment variable.
        Without one the sink logs one info message and stays off.
    format : callable, optional
        ``format(event, run_name) -> dict``. Default :func:`json_payload`.
    run_name : str, optional
        Label of the run, sent as ``"run"``.
    kinds : iterable of {'forecast', 'warning', 'advice', 'summary'}, optional
        Posted every time. Default ``('warning', 'advice', 'summary')``; add ``'forecast'``
        to receive every forecast update.
    milestones : iterable of float, optional
        Fractions of the run at which one forecast is posted. Default (0.25, 0.5, 0.75).
    **options
        Sending options, see :class:`~lossforecast.sinks.HttpSink`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        format: PayloadFormatter | None = None,
        run_name: str | None = None,
        kinds: Iterable[str] = DEFAULT_KINDS,
        milestones: Iterable[float] = DEFAULT_MILESTONES,
        **options,
    ) -> None:
        super().__init__(
            url,
            format=json_payload if format is None else format,
            env_var="LOSSFORECAST_WEBHOOK_URL",
            run_name=run_name,
            kinds=kinds,
            milestones=milestones,
            **options,
        )


def json_payload(event: Event, run_name: str | None = None) -> dict:
    """The generic body: ``source``, ``run``, ``text`` and the event's fields (``Event.to_dict``).

    ``text`` is a one-line summary, so services that show a ``text`` field (Mattermost,
    Rocket.Chat, ...) display something readable as is.

    Examples
    --------
    >>> body = json_payload(Event("advice", "info", 800, "cool down now"), "run-7")
    >>> body["source"], body["run"], body["kind"], body["text"]
    ('lossforecast', 'run-7', 'advice', 'lossforecast run-7 advice at step 800: cool down now')
    """
    run = f" {run_name}" if run_name else ""
    kind = "summary" if event.is_summary else event.kind
    return {
        "source": "lossforecast",
        "run": run_name,
        "text": f"lossforecast{run} {kind} at step {event.step}: {event.message}",
        **event.to_dict(),
    }
