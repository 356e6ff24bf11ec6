"""Standard Webhooks signing: our signatures verify with the independent `standardwebhooks` package,
its signatures verify with ours, and every way a delivery can be wrong is refused."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import standardwebhooks

from inference_server.db import Tenant
from webhooks import WebhookVerificationError, sign, verify
from webhooks.secrets import new_secret, signing_secrets
from webhooks.signing import webhook_headers

BODY = json.dumps(
    {"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "j1"}}
).encode()


def test_new_secret_format() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert new_secret() != secret


def test_our_signature_verifies_with_standardwebhooks() -> None:
    secret = new_secret()
    headers = webhook_headers("msg_1", BODY, [secret])
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    assert verify(BODY, headers, secret) == json.loads(BODY)


def test_standardwebhooks_signature_verifies_with_ours() -> None:
    secret = new_secret()
    now = datetime.now(UTC)
    sig = standardwebhooks.Webhook(secret).sign("msg_2", now, BODY.decode())
    headers = {
        "Webhook-Id": "msg_2",
        "Webhook-Timestamp": str(int(now.timestamp())),
        "Webhook-Signature": sig,
    }
    assert verify(BODY, headers, secret)["data"]["id"] == "j1"
    assert sig == sign("msg_2", int(now.timestamp()), BODY, secret)


def test_rotation_header_carries_both_signatures() -> None:
    old, new = new_secret(), new_secret()
    headers = webhook_headers("msg_3", BODY, [new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        verify(BODY, headers, secret)
        standardwebhooks.Webhook(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        verify(BODY, headers, new_secret())


def test_signing_secrets_follow_the_grace_period() -> None:
    now = datetime.now(UTC)
    tenant = Tenant(
        name="t",
        webhook_secret="whsec_bmV3",
        previous_webhook_secret="whsec_b2xk",
        previous_secret_expires_at=now + timedelta(hours=1),
    )
    assert signing_secrets(tenant, now) == ["whsec_bmV3", "whsec_b2xk"]
    assert signing_secrets(tenant, now + timedelta(hours=2)) == ["whsec_bmV3"]
    tenant.previous_webhook_secret = None
    assert signing_secrets(tenant, now) == ["whsec_bmV3"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h, b: (h, b + b" "), "no webhook signature matches"),
        (lambda h, b: ({**h, "webhook-id": "msg_other"}, b), "no webhook signature matches"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "missing"),
        (lambda h, b: ({**h, "webhook-timestamp": "yesterday"}, b), "unix seconds"),
        (
            lambda h, b: ({**h, "webhook-signature": "v2," + h["webhook-signature"][3:]}, b),
            "no webhook signature",
        ),
    ],
)
def test_tampering_is_refused(mutate, message) -> None:  # type: ignore[no-untyped-def]
    secret = new_secret()
    headers, body = mutate(webhook_headers("msg_4", BODY, [secret]), BODY)
    with pytest.raises(WebhookVerificationError, match=message):
        verify(body, headers, secret)


def test_timestamp_tolerance_is_five_minutes() -> None:
    secret = new_secret()
    now = time.time()
    old = webhook_headers("msg_5", BODY, [secret], now=now - 301)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(BODY, old, secret)
    future = webhook_headers("msg_5", BODY, [secret], now=now + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(BODY, future, secret)
    verify(BODY, webhook_headers("msg_5", BODY, [secret], now=now - 290), secret)


def test_bad_secret_is_a_clear_error() -> None:
    with pytest.raises(WebhookVerificationError, match="base64"):
        verify(BODY, webhook_headers("m", BODY, [new_secret()]), "whsec_!!!")
