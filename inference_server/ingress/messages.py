"""Reading one AMQP delivery as a job request: the body is the ``POST /v1/jobs`` JSON, validated by
the same ``JobRequest``; the properties carry what HTTP puts in headers.

- ``message_id``: the idempotency key (required: it is what makes a redelivery harmless).
- header ``authorization: Bearer <api key>``, or the ``user_id`` property when the broker
  validates it and ``INGRESS_TRUST_USER_ID`` is set (then it names the tenant).
- ``reply_to`` / ``correlation_id``: the job's events are published to that queue; header
  ``events``: only those events (a list or a comma-separated string; absent: all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pika.spec import BasicProperties
from pydantic import ValidationError

from inference_server.errors import InvalidRequest
from inference_server.jobs.enums import EventType
from inference_server.jobs.service import Reply
from inference_server.jobs.spec import JobRequest

MAX_ID = 255  # message_id, reply_to and correlation_id share the columns' bound


@dataclass(frozen=True)
class Request:
    """A delivery read as a job request (not yet authenticated)."""

    message_id: str
    authorization: str | None
    user_id: str | None
    job: JobRequest
    reply: Reply | None


def header(properties: BasicProperties, name: str) -> str | None:
    """A message header by case-insensitive name, as text."""
    for key, value in (properties.headers or {}).items():
        if key.lower() == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def reply_of(properties: BasicProperties) -> str | None:
    """The reply queue of a delivery, if it names a usable one."""
    reply_to = properties.reply_to
    return reply_to if reply_to and len(reply_to) <= MAX_ID else None


def parse(properties: BasicProperties, body: bytes, routing_key: str) -> Request:
    """The request a delivery carries; ``InvalidRequest`` (with its catalogue code) if it carries none."""
    message_id = properties.message_id
    if not message_id:
        raise InvalidRequest(
            "the message has no message_id: set it (it is the idempotency key)", code="missing_message_id"
        )
    if len(message_id) > MAX_ID:
        raise InvalidRequest(f"message_id is longer than {MAX_ID} characters", code="missing_message_id")
    data = _json_object(body)
    if "family" not in data and routing_key and routing_key != "#":
        data["family"] = routing_key  # the routing key names the family when the body does not
    try:
        job = JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc), code="validation_error") from None
    if routing_key not in ("", "#", job.family):
        raise InvalidRequest(
            f"routing key {routing_key!r} differs from the body's family {job.family!r}",
            code="invalid_message",
        )
    reply = None
    reply_to = reply_of(properties)
    if properties.reply_to and reply_to is None:
        raise InvalidRequest(f"reply_to is longer than {MAX_ID} characters", code="invalid_message")
    if reply_to:
        correlation = properties.correlation_id
        if correlation and len(correlation) > MAX_ID:
            raise InvalidRequest(f"correlation_id is longer than {MAX_ID} characters", code="invalid_message")
        reply = Reply(reply_to, correlation or None, _events((properties.headers or {}).get("events")))
    return Request(message_id, header(properties, "authorization"), properties.user_id, job, reply)


def describe(exc: ValidationError) -> str:
    """A validation error as the API words it: ``field: problem; ...``."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(problems)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the message body is not JSON", code="invalid_message") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the message body must be a JSON object (a job request)", code="invalid_message")
    return data


def _events(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise InvalidRequest(
            "the events header must be a list or a comma-separated string", code="invalid_message"
        )
    parsed = []
    for name in names:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        try:
            parsed.append(EventType.parse(str(name)).value)
        except ValueError:
            known = ", ".join(e.value for e in EventType)
            raise InvalidRequest(
                f"unknown event {name!r} in the events header (known: {known})", code="invalid_message"
            ) from None
    return parsed
