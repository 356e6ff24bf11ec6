"""Reading AMQP deliveries as job requests (``ingress.messages``), and the ``user_id`` tenant mapping
on a real database: the rules the live ingress tests do not each walk through."""

from __future__ import annotations

import json

import pika
import pytest

from inference_server.errors import InferenceError
from inference_server.ingress.consumer import Ingress
from inference_server.ingress.health import Health
from inference_server.ingress.messages import parse
from inference_server.jobs.service import JobContext
from inference_server.registry import Registry
from inference_server.settings import Settings
from inference_server.storage import open_storage

BODY = {"family": "sd15", "prompt": "a fox", "steps": 2}


def props(**kw: object) -> pika.BasicProperties:
    return pika.BasicProperties(**{"message_id": "m-1", "headers": {"Authorization": "Bearer k"}, **kw})


def test_a_request_reads_its_key_reply_and_events() -> None:
    request = parse(
        props(
            reply_to="replies",
            correlation_id="c",
            headers={"Authorization": b"Bearer k", "events": "succeeded"},
        ),
        json.dumps(BODY).encode(),
        "sd15",
    )
    assert request.message_id == "m-1" and request.authorization == "Bearer k"
    assert (
        request.reply is not None and request.reply.queue == "replies" and request.reply.correlation_id == "c"
    )
    assert request.reply.events == ["job.succeeded"]
    assert request.job.family == "sd15" and request.job.steps == 2


def test_the_routing_key_names_the_family_when_the_body_does_not() -> None:
    body = {k: v for k, v in BODY.items() if k != "family"}
    assert parse(props(), json.dumps(body).encode(), "sdxl").job.family == "sdxl"


@pytest.mark.parametrize(
    ("properties", "body", "routing_key", "code"),
    [
        (props(message_id=None), BODY, "sd15", "missing_message_id"),
        (props(message_id="x" * 256), BODY, "sd15", "missing_message_id"),
        (props(), b"\xff\xfe", "sd15", "invalid_message"),
        (props(), [1, 2], "sd15", "invalid_message"),
        (props(), BODY, "sdxl", "invalid_message"),  # the routing key contradicts the body
        (props(), {**BODY, "steps": 0}, "sd15", "validation_error"),
        (props(), {**BODY, "unknown_field": 1}, "sd15", "validation_error"),
        (props(reply_to="r", headers={"events": "nonsense"}), BODY, "sd15", "invalid_message"),
        (props(reply_to="r" * 300), BODY, "sd15", "invalid_message"),
    ],
)
def test_an_unusable_delivery_is_refused_with_a_code(properties, body, routing_key, code) -> None:  # type: ignore[no-untyped-def]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(InferenceError) as info:
        parse(properties, raw, routing_key)
    assert info.value.code == code
    assert "Traceback" not in info.value.message and "<" not in info.value.message


def test_user_id_names_the_tenant_only_when_trusted(scratch_db, scratch_db_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from api.auth import create_tenant_key

    with scratch_db() as session:
        tenant, _ = create_tenant_key(session, "backend-a")
        tenant_id = tenant.id
    request = parse(props(headers={}, user_id="backend-a"), json.dumps(BODY).encode(), "sd15")
    stranger = parse(props(headers={}, user_id="nobody"), json.dumps(BODY).encode(), "sd15")

    def ingress(trust: bool) -> Ingress:
        settings = Settings(
            database_url=scratch_db_url, storage_url=tmp_path.as_uri(), ingress_trust_user_id=trust
        )
        ctx = JobContext(settings, Registry(None, {}), open_storage(settings))
        return Ingress(settings, scratch_db, ctx, Health())

    with scratch_db() as session:
        assert ingress(True)._tenant(session, request).id == tenant_id
        with pytest.raises(InferenceError) as unknown:
            ingress(True)._tenant(session, stranger)
        assert unknown.value.code == "unknown_tenant"
        with pytest.raises(InferenceError) as untrusted:
            ingress(False)._tenant(session, request)
        assert untrusted.value.code == "missing_api_key"
