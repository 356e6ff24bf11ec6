"""Job events as the clients' ``stream`` and ``events`` yield them, and the Server-Sent Events parsing
both clients share (the wire format: https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TERMINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.canceled"})
STREAM_READ_TIMEOUT = 60.0  # above the server's keep-alive interval (15 s): silence this long is a dead link


@dataclass(frozen=True)
class Event:
    """One job event: ``seq`` its sequence number (resume after it with ``last_event_id``),
    ``type`` (``job.progress``, ...), and ``data``, the job as the event saw it (the webhook body's
    ``data``; a progress event of a job no webhook takes progress from carries only id, status and
    progress)."""

    seq: int
    type: str
    timestamp: str | None
    data: dict[str, Any]
    body: dict[str, Any] = field(repr=False, default_factory=dict)  # the whole webhook body

    @property
    def job_id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def terminal(self) -> bool:
        """The job's last event: the stream of a job ends after it."""
        return self.type in TERMINAL_EVENTS

    @property
    def progress(self) -> dict[str, Any]:
        return self.data.get("progress") or {}


class SSEParser:
    """Lines in, ``Event``s out: ``feed`` each line (without its line break) as it arrives."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._type = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """The event a blank line completes, else None (comments, keep-alives and partial events)."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\x00" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        data, event_type, event_id = "\n".join(self._data), self._type, self._id
        self._data, self._type = [], "message"
        if not data or event_id is None or not event_id.isdigit():
            return None
        body = json.loads(data)
        return Event(int(event_id), event_type, body.get("timestamp"), body.get("data") or {}, body)


def stream_headers(last_event_id: int | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return headers
