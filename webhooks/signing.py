"""Standard Webhooks signing and verification (https://www.standardwebhooks.com).

A delivery carries ``webhook-id`` (the event id, stable across retries), ``webhook-timestamp``
(unix seconds of this attempt) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` of
``"{id}.{timestamp}.{body}"`` over the exact body bytes, one per valid secret, space-separated.
Secrets are written ``whsec_<base64 key>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from inference_server.errors import InferenceError

SECRET_PREFIX = "whsec_"
TOLERANCE_SECONDS = 300


class WebhookVerificationError(InferenceError):
    """A webhook's headers, timestamp or signature do not check out."""

    code = "webhook_verification_failed"


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key inside a ``whsec_`` secret (raw bytes are used as they are)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        text = secret.removeprefix(SECRET_PREFIX)
        try:
            # Tolerate unpadded base64, as the reference libraries do.
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise WebhookVerificationError("the webhook secret is not valid base64") from exc
    if not key:
        raise WebhookVerificationError("the webhook secret is empty")
    return key


def sign(msg_id: str, timestamp: int, body: bytes, secret: str | bytes) -> str:
    """One signature, ``v1,<base64>``, of ``id.timestamp.body`` with ``secret``."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signature_header(msg_id: str, timestamp: int, body: bytes, secrets: Iterable[str | bytes]) -> str:
    """The ``webhook-signature`` value: one signature per secret, space-separated (rotation)."""
    return " ".join(sign(msg_id, timestamp, body, s) for s in secrets)


def webhook_headers(
    msg_id: str, body: bytes, secrets: Iterable[str | bytes], *, now: float | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt, stamped ``now``."""
    ts = int(time.time() if now is None else now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature_header(msg_id, ts, body, secrets),
    }


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str | bytes,
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """Check a received webhook and return its JSON-decoded body.

    ``body`` must be the raw bytes received (not re-serialized JSON). ``headers`` is any mapping;
    names are matched case-insensitively. Raises ``WebhookVerificationError`` when a header is
    missing, the timestamp is more than ``tolerance`` seconds away from ``now``, or no ``v1``
    signature matches ``secret``."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(stamp)
    except ValueError as exc:
        raise WebhookVerificationError("webhook-timestamp is not unix seconds") from exc
    current = time.time() if now is None else now
    if ts < current - tolerance:
        raise WebhookVerificationError("webhook timestamp is too old")
    if ts > current + tolerance:
        raise WebhookVerificationError("webhook timestamp is in the future")
    expected = sign(msg_id, ts, raw, secret).encode()
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise WebhookVerificationError("the webhook body is not JSON") from exc
    raise WebhookVerificationError("no webhook signature matches the secret")
